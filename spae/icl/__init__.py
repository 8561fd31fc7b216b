"""In-context learning with a frozen LLM (sections 3.2, 4.2, 4.3): few-shot episodes, progressive
decoding (eq. 11) and a reference learner. Pure Python; LLM clients live in ``pipeline.llm.llm``."""

from spae.icl.decoding import (
    DecodingConfig,
    DecodingResult,
    DecodingTask,
    Segment,
    decode_image,
    denoising_task,
    generation_task,
    plan_segments,
    progressive_decode,
)
from spae.icl.episodes import (
    Episode,
    LabelledImages,
    PromptTemplate,
    Setting,
    build_prompt,
    image_text,
    parse_answer,
    sample_episode,
    sample_episodes,
)
from spae.icl.learners import BudgetCheck, Completion, LanguageModel, ReferenceLearner, check_budget

__all__ = [
    "BudgetCheck",
    "Completion",
    "DecodingConfig",
    "DecodingResult",
    "DecodingTask",
    "Episode",
    "LabelledImages",
    "LanguageModel",
    "PromptTemplate",
    "ReferenceLearner",
    "Segment",
    "Setting",
    "build_prompt",
    "check_budget",
    "decode_image",
    "denoising_task",
    "generation_task",
    "image_text",
    "parse_answer",
    "plan_segments",
    "progressive_decode",
    "sample_episode",
    "sample_episodes",
]
