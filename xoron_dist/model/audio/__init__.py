"""Audio understanding and speech generation (issue 12): the waveform codec, the Conformer encoder with
"RMLA" (rotary multi-head latent attention) and their tensor-parallel plans; each module's docstring says more."""
