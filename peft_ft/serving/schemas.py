"""Request and response bodies of `peft-ft serve`, one model per task family: FastAPI validates requests
against them (422 with the field that is wrong) and publishes them in `/openapi.json` and `/docs`.

A request names its adapter in the path; the adapter's family says which fields each row needs, so the
row models below document the families and `PredictRequest.inputs` takes any of them (a row is checked
against its adapter's family after routing: `Task.answers.to_input` of the family's module in `peft_ft.tasks`).
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

TEXT_LIMIT = 1_000_000  # characters of one string; the body limit (--max-body-bytes) binds first


class TextRow(BaseModel):
    """Classification, NER or seq2seq: one text."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"text": "the plant needs water and light"}]})
    text: str = Field(max_length=TEXT_LIMIT)


class PairRow(BaseModel):
    """Pair classification (grading, NLI): a text and its second text, e.g. an answer and the reference."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"text": "they need water", "text_pair": "plants need water and light"}]})
    text: str = Field(max_length=TEXT_LIMIT)
    text_pair: str = Field(max_length=TEXT_LIMIT)


class TokensRow(BaseModel):
    """NER on pre-tokenized words (CoNLL style); entity offsets refer to the words joined by spaces."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"tokens": ["John", "lives", "in", "Paris"]}]})
    tokens: list[str]


class QuestionRow(BaseModel):
    """Extractive QA: the answer is a span of `context`; long contexts are read in overlapping windows."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"question": "Where does John live?", "context": "John lives in Paris."}]})
    question: str = Field(max_length=TEXT_LIMIT)
    context: str = Field(max_length=TEXT_LIMIT)


Row = Union[PairRow, QuestionRow, TokensRow, TextRow, dict[str, Any]]


class PredictRequest(BaseModel):
    """Exactly one of `text` (one text), `texts` (several) or `inputs` (rows with the family's fields,
    or plain strings). Seq2seq runs trained from a template (`task.input_template`) also take rows with
    the template's fields."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(default=None, max_length=TEXT_LIMIT, description="one text")
    texts: list[str] | None = Field(default=None, description="several texts, answered in order")
    inputs: list[Union[Row, str]] | None = Field(default=None, description="rows with the fields of the adapter's task family")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("text", "texts", "inputs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f'give exactly one of "text", "texts" or "inputs" (got {", ".join(given) or "none"})')
        return self

    def rows(self) -> tuple[list[dict], list[str]]:
        """The request as rows (dicts) and their names for error messages (`inputs[3]`)."""
        if self.text is not None:
            return [{"text": self.text}], ["text"]
        if self.texts is not None:
            return [{"text": t} for t in self.texts], [f"texts[{i}]" for i in range(len(self.texts))]
        rows = [{"text": r} if isinstance(r, str) else (r if isinstance(r, dict) else r.model_dump()) for r in self.inputs]
        return rows, [f"inputs[{i}]" for i in range(len(rows))]


PREDICT_EXAMPLES = {
    "classification": {"summary": "classification: one text", "value": {"text": "the film was great"}},
    "batch": {"summary": "classification or NER: several texts", "value": {"texts": ["the film was great", "John lives in Paris"]}},
    "pair": {"summary": "pair classification (grading, NLI)", "value": {"inputs": [{"text": "they need water", "text_pair": "plants need water and light"}]}},
    "ner_tokens": {"summary": "NER on pre-tokenized words", "value": {"inputs": [{"tokens": ["John", "lives", "in", "Paris"]}]}},
    "qa": {"summary": "extractive QA", "value": {"inputs": [{"question": "Where does John live?", "context": "John lives in Paris."}]}},
    "seq2seq": {"summary": "seq2seq", "value": {"text": "question: where does John live? context: John lives in Paris."}},
}


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")
    adapter: str = Field(description="the adapter that answered")
    truncated: bool = Field(description="the input was longer than the run's model.max_length; only its start was read")


class LabelAnswer(_Answer):
    label: str
    score: float


class Entity(BaseModel):
    model_config = ConfigDict(extra="allow")
    entity_group: str
    word: str
    start: int
    end: int
    score: float


class EntitiesAnswer(_Answer):
    entities: list[Entity]
    tags: list[str] = Field(description="one label per word (the row's tokens, or the text's words: whitespace-separated, punctuation apart for a Label Studio run), "
                                        "as the evaluation decides it: an entity may open with I-")


class SpanAnswer(_Answer):
    answer: str = Field(description="the span of the context; empty when no span scored")
    score: float
    start: int = Field(description="character offset of the answer in the context")
    end: int


class GeneratedAnswer(_Answer):
    generated_text: str


class PredictResponse(BaseModel):
    adapter: str
    predictions: list[Union[LabelAnswer, EntitiesAnswer, SpanAnswer, GeneratedAnswer]]


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong and what to do")


class AdapterInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    task: str
    pipeline_task: str
    method: str
    base_model: str
    labels: list[str] | None = None
    run_dir: str
    resident: bool = Field(description="loaded now; false: unloaded by --max-adapters, reloaded on its next request")
    mixes: bool = Field(description="its rows share forwards with another loaded adapter (LoRA without DoRA on the same "
                                    "base, with the same labels and max_length)")


class AdaptersResponse(BaseModel):
    adapters: dict[str, AdapterInfo]


class LoadRequest(BaseModel):
    """Load a run folder at runtime: `path` is relative to the server's --adapter-dir."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "grading", "path": "grading_lora"}]})
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)
    path: str = Field(min_length=1, max_length=4096)


class HealthResponse(BaseModel):
    status: str
    adapters: int
