"""Speech generation (issue 12, item 4): LLM hidden states for a text -> 16 kHz speech. ``tts`` holds the
text prior, duration predictor and latent decoder; ``alignment`` holds Monotonic Alignment Search
(Glow-TTS/VITS), which aligns text tokens to the target's latent frames during training and yields the
durations the duration predictor learns, with the per (token, frame) Gaussian log-likelihood it searches
over; ``bigvgan``, ``discriminators`` and ``losses`` turn latent frames into a waveform and train that."""
