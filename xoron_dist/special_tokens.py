"""The table of Xoron's special tokens, in id order after the regular vocabulary. Append only.

Three tiers, each appended after the one before, so no id ever moves:

* ``BASE_TOKENS`` (16): the project's first reservation: end of text, padding, Qwen2.5's chat
  markers, each modality's start/end/placeholder, and the generation requests.
* ``SEED_TOKENS`` (233): the seed's (Xoron-Dev ``config/special_tokens.py``) tokens for sequence
  control, conversation, memory, fill-in-the-middle, git, execution/Jupyter, file operations,
  documents, the seed's multimodal spellings, tool calling, code, reasoning, anti-hallucination,
  citation and voice. With the base tokens that is 249 ids: they fit the 256 slots that
  ``model.llm.special_token_slots`` reserves by default.
* ``EXTENDED_TOKENS`` (162): the rest of the seed's list (repository/issue/PR metadata, file-type
  markers, temporal/video navigation, programming-language tags, structured data, task markers,
  misc markers). The seed has 395 tokens besides the base ones, more than the 240 free slots.

A tokenizer holds the largest tier that the model's embedding rows (``model.llm.padded_vocab_size``)
hold (``tokenizer.complete_special_tokens``): all 411 with ``special_token_slots: 512``; 249 with
the default 256; the base 16 with fewer (the tiny preset's 64, and every run made before the seed
tiers existed, keeps working unchanged). A run resumed with more slots than it was saved with gains
the next tier; ids it had never move.

Not taken from the seed: its duplicates of base tokens (``<|pad|>``, ``<|gen_image|>``,
``<|gen_video|>``), and its ten "internal control" markers (``[e~[``, ``]~e]`` ...), which are not
in the ``<|...|>`` form and would be cut out of ordinary text (``a[e~[0]`` in code) as special tokens.
The seed's ``<|bos|>``/``<|eos|>`` are here as tokens; the end of a document stays
``<|endoftext|>`` (Qwen2.5's, and every prepared dataset's) and chat turns end in ``<|im_end|>``.

``special_token_name("<|think|>") == "think"`` keys ``XoronTokenizer.special_ids``; closing tokens
keep their slash (``"/think"``).
"""

from __future__ import annotations

BASE_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # end of a document; also the EOS of generation
    "<|pad|>",
    "<|im_start|>",  # chat turns, as in Qwen2.5: <|im_start|>user\n...<|im_end|>
    "<|im_end|>",
    "<|image_start|>",  # each modality: begin, end, and the placeholder its encoder's embeddings replace
    "<|image_end|>",
    "<|image_pad|>",
    "<|video_start|>",
    "<|video_end|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<|gen_image|>",  # the model asks a generator head for output of that kind
    "<|gen_video|>",
    "<|gen_speech|>",
)

SEED_TOKENS: tuple[str, ...] = (
    # sequence control
    "<|bos|>", "<|eos|>", "<|prompt|>", "<|/prompt|>", "<|text|>", "<|/text|>", "<|response|>", "<|/response|>",
    # conversation
    "<|system|>", "<|/system|>", "<|user|>", "<|/user|>", "<|assistant|>", "<|/assistant|>",
    # memory and context
    "<|memory|>", "<|/memory|>", "<|working_memory|>", "<|/working_memory|>", "<|long_term_memory|>",
    "<|/long_term_memory|>",
    "<|summary|>", "<|/summary|>", "<|condensed|>", "<|/condensed|>",
    "<|user_profile|>", "<|/user_profile|>", "<|user_pref|>", "<|/user_pref|>", "<|hard_rule|>", "<|/hard_rule|>",
    "<|session|>", "<|/session|>", "<|conv_history|>", "<|/conv_history|>",
    # fill-in-the-middle
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    # version control
    "<|commit_before|>", "<|/commit_before|>", "<|commit_after|>", "<|/commit_after|>", "<|commit_msg|>",
    "<|/commit_msg|>",
    "<|diff|>", "<|/diff|>", "<|diff_add|>", "<|diff_del|>", "<|diff_ctx|>",
    # interactive execution
    "<|jupyter|>", "<|/jupyter|>", "<|jupyter_code|>", "<|/jupyter_code|>", "<|jupyter_output|>",
    "<|/jupyter_output|>",
    "<|jupyter_text|>", "<|/jupyter_text|>", "<|jupyter_error|>", "<|/jupyter_error|>", "<|empty_output|>",
    "<|exec|>", "<|/exec|>", "<|exec_result|>", "<|/exec_result|>", "<|exec_error|>", "<|/exec_error|>",
    "<|exec_timeout|>",
    # file system operations
    "<|add_file|>", "<|/add_file|>", "<|delete_file|>", "<|/delete_file|>", "<|rename_file|>", "<|/rename_file|>",
    "<|edit_file|>", "<|/edit_file|>", "<|read_file|>", "<|/read_file|>", "<|file_sep|>", "<|file_content|>",
    "<|/file_content|>",
    "<|edit_range|>", "<|/edit_range|>", "<|line|>", "<|/line|>", "<|insert_before|>", "<|insert_after|>",
    "<|replace|>", "<|/replace|>",
    # documents
    "<|doc|>", "<|/doc|>", "<|eod|>",
    "<|filename|>", "<|/filename|>", "<|filepath|>", "<|/filepath|>",
    # multimodal input (the seed's spellings)
    "<|image|>", "<|/image|>", "<|video|>", "<|/video|>",
    # generation output
    "<|/gen_image|>", "<|/gen_video|>",
    # tool calling
    "<|tool_call|>", "<|/tool_call|>", "<|tool_result|>", "<|/tool_result|>", "<|function_name|>",
    "<|/function_name|>",
    "<|function_args|>", "<|/function_args|>", "<|arg_name|>", "<|/arg_name|>", "<|arg_value|>", "<|/arg_value|>",
    "<|tools|>", "<|/tools|>", "<|function_def|>", "<|/function_def|>", "<|available_tools|>",
    "<|/available_tools|>",
    "<|tool_def|>", "<|/tool_def|>", "<|tool_name|>", "<|/tool_name|>", "<|tool_desc|>", "<|/tool_desc|>",
    "<|tool_params|>", "<|/tool_params|>",
    "<|param_name|>", "<|/param_name|>", "<|param_type|>", "<|/param_type|>", "<|param_required|>",
    "<|param_optional|>",
    "<|tool_error|>", "<|/tool_error|>", "<|tool_success|>", "<|tool_calls|>", "<|/tool_calls|>", "<|tool_id|>",
    "<|/tool_id|>",
    # code
    "<|code|>", "<|/code|>",
    # reasoning
    "<|think|>", "<|/think|>", "<|observation|>", "<|/observation|>", "<|note|>", "<|/note|>", "<|step|>",
    "<|/step|>",
    "<|reflection|>", "<|/reflection|>", "<|hypothesis|>", "<|/hypothesis|>", "<|conclusion|>", "<|/conclusion|>",
    "<|plan|>", "<|/plan|>", "<|plan_step|>", "<|/plan_step|>", "<|critique|>", "<|/critique|>", "<|error_found|>",
    "<|no_error|>",
    "<|analysis|>", "<|/analysis|>", "<|breakdown|>", "<|/breakdown|>", "<|decision|>", "<|/decision|>",
    "<|option|>", "<|/option|>",
    "<|chosen|>", "<|rejected|>", "<|because|>", "<|therefore|>", "<|however|>", "<|alternatively|>",
    # anti-hallucination and uncertainty
    "<|confidence:high|>", "<|confidence:medium|>", "<|confidence:low|>", "<|confidence:uncertain|>",
    "<|uncertainty_score|>", "<|/uncertainty_score|>", "<|certainty_score|>", "<|/certainty_score|>",
    "<|uncertain|>", "<|/uncertain|>", "<|unknown|>", "<|need_verify|>", "<|may_outdated|>", "<|speculative|>",
    "<|approximate|>",
    "<|verify|>", "<|/verify|>", "<|fact_check|>", "<|self_correct|>", "<|correction|>", "<|/correction|>",
    "<|retract|>", "<|clarify|>",
    # citation and grounding
    "<|cite|>", "<|/cite|>", "<|source|>", "<|/source|>", "<|ref|>", "<|/ref|>", "<|quote|>", "<|/quote|>",
    "<|attribution|>", "<|/attribution|>",
    "<|context|>", "<|/context|>", "<|retrieved|>", "<|/retrieved|>", "<|grounded|>", "<|ungrounded|>",
    "<|partially_grounded|>",
    "<|knowledge_cutoff|>", "<|beyond_knowledge|>", "<|within_knowledge|>", "<|knowledge_date|>",
    "<|/knowledge_date|>",
    # voice and audio
    "<|listen|>", "<|/listen|>", "<|speak|>", "<|/speak|>", "<|audio|>", "<|/audio|>",
    "<|audio_prompt|>", "<|/audio_prompt|>", "<|speaker_ref|>", "<|/speaker_ref|>",
)

EXTENDED_TOKENS: tuple[str, ...] = (
    # repository metadata, issues, pull requests
    "<|reponame|>", "<|/reponame|>", "<|gh_stars|>", "<|/gh_stars|>", "<|branch|>", "<|/branch|>",
    "<|issue|>", "<|/issue|>", "<|issue_title|>", "<|/issue_title|>", "<|issue_body|>", "<|/issue_body|>",
    "<|issue_closed|>", "<|issue_open|>",
    "<|pr|>", "<|/pr|>", "<|pr_title|>", "<|/pr_title|>", "<|pr_body|>", "<|/pr_body|>", "<|pr_merged|>",
    "<|pr_closed|>",
    # file types
    "<|file:txt|>", "<|/file:txt|>", "<|file:md|>", "<|/file:md|>", "<|file:json|>", "<|/file:json|>",
    "<|file:xml|>", "<|/file:xml|>",
    "<|file:yaml|>", "<|/file:yaml|>", "<|file:html|>", "<|/file:html|>", "<|file:css|>", "<|/file:css|>",
    "<|file:csv|>", "<|/file:csv|>",
    "<|file:toml|>", "<|/file:toml|>", "<|file:ini|>", "<|/file:ini|>", "<|file:log|>", "<|/file:log|>",
    # temporal and video navigation
    "<|timestamp|>", "<|/timestamp|>", "<|time_range|>", "<|/time_range|>", "<|keyframe|>", "<|/keyframe|>",
    "<|scene_change|>", "<|scene|>", "<|/scene|>", "<|segment|>", "<|/segment|>", "<|frame|>", "<|/frame|>",
    "<|frame_num|>", "<|/frame_num|>",
    "<|action|>", "<|/action|>", "<|event|>", "<|/event|>", "<|region|>", "<|/region|>", "<|bbox|>", "<|/bbox|>",
    "<|object|>", "<|/object|>",
    # programming languages
    "<|lang:python|>", "<|lang:javascript|>", "<|lang:typescript|>", "<|lang:java|>", "<|lang:cpp|>", "<|lang:c|>",
    "<|lang:csharp|>",
    "<|lang:go|>", "<|lang:rust|>", "<|lang:ruby|>", "<|lang:php|>", "<|lang:swift|>", "<|lang:kotlin|>",
    "<|lang:scala|>", "<|lang:shell|>",
    "<|lang:bash|>", "<|lang:sql|>", "<|lang:r|>", "<|lang:matlab|>", "<|lang:lua|>", "<|lang:perl|>",
    "<|lang:haskell|>", "<|lang:other|>",
    # structured data
    "<|table|>", "<|/table|>", "<|row|>", "<|/row|>", "<|cell|>", "<|/cell|>", "<|thead|>", "<|/thead|>",
    "<|tbody|>", "<|/tbody|>",
    "<|schema|>", "<|/schema|>", "<|field|>", "<|/field|>", "<|type|>", "<|/type|>", "<|required|>", "<|optional|>",
    "<|version|>", "<|/version|>", "<|deprecated|>", "<|since|>", "<|/since|>", "<|changelog|>", "<|/changelog|>",
    "<|json|>", "<|/json|>", "<|xml|>", "<|/xml|>", "<|yaml|>", "<|/yaml|>", "<|csv|>", "<|/csv|>",
    "<|list|>", "<|/list|>", "<|item|>", "<|/item|>", "<|ol|>", "<|/ol|>", "<|ul|>", "<|/ul|>",
    "<|kv|>", "<|/kv|>", "<|key|>", "<|/key|>", "<|value|>", "<|/value|>",
    # task and instruction markers
    "<|task|>", "<|/task|>", "<|task_type|>", "<|/task_type|>", "<|instruction|>", "<|/instruction|>",
    "<|constraint|>", "<|/constraint|>",
    "<|example|>", "<|/example|>", "<|input|>", "<|/input|>", "<|output|>", "<|/output|>", "<|expected|>",
    "<|/expected|>",
    # special markers
    "<|sep|>", "<|nl|>", "<|mask|>", "<|...|>", "<|cont|>", "<|truncated|>", "<|redacted|>",
)

# Base + seed (fits the default 256 slots), and every tier (needs 411 slots).
SPECIAL_TOKENS: tuple[str, ...] = BASE_TOKENS + SEED_TOKENS
ALL_SPECIAL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + EXTENDED_TOKENS


def special_token_name(token: str) -> str:
    """``"<|image_pad|>"`` -> ``"image_pad"``, the key of ``XoronTokenizer.special_ids``."""
    return token[2:-2]


def id_table_markdown(special_ids: dict[str, int]) -> str:
    """A markdown table of ``special_ids`` (name -> id) in id order, with each token's tier."""
    tiers = {**dict.fromkeys(BASE_TOKENS, "base"), **dict.fromkeys(SEED_TOKENS, "seed"),
             **dict.fromkeys(EXTENDED_TOKENS, "extended")}
    lines = ["| id | token | tier |", "| ---: | --- | --- |"]
    for token in ALL_SPECIAL_TOKENS:
        name = special_token_name(token)
        if name in special_ids:
            lines.append(f"| {special_ids[name]} | `{token}` | {tiers[token]} |")
    return "\n".join(lines) + "\n"


__all__ = ["ALL_SPECIAL_TOKENS", "BASE_TOKENS", "EXTENDED_TOKENS", "SEED_TOKENS", "SPECIAL_TOKENS",
           "id_table_markdown", "special_token_name"]
