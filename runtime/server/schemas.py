"""Pydantic models of every request and response: OpenAI's shapes plus TabbyAPI's extra fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# --- requests ------------------------------------------------------------------------------------


class Lenient(BaseModel):
    # clients send fields we do not use (user, metadata, ...); NaN/inf are no number a field takes
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImageURL(Lenient):
    url: str = Field(min_length=1)
    detail: str | None = None


class ContentPart(Lenient):
    type: Literal["text", "image_url", "input_image", "image"]
    text: str | None = None
    image_url: ImageURL | str | None = None

    @model_validator(mode="after")
    def _complete(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.type != "text" and self.image_url is None:
            raise ValueError(
                f"an {self.type} part needs `image_url` (a data: URL, or an http(s)/file URL where enabled)"
            )
        return self

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url  # type: ignore[union-attr]


class FunctionCall(Lenient):
    name: str = Field(min_length=1, max_length=256)
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs `content`")
        return self


class FunctionDef(Lenient):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Lenient):
    type: Literal["function"] = "function"
    function: dict[str, str]


class StreamOptions(Lenient):
    include_usage: bool = False


class ResponseFormat(Lenient):
    type: str = "text"


class SamplingFields(Lenient):
    """Sampling and length fields shared by chat and text completions (OpenAI + TabbyAPI names)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)  # OpenAI refuses 0; leave it out to fill the context
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    typical: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    penalty_range: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str | int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    ban_eos_token: bool = False

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for alias, name in (
                ("typical_p", "typical"),
                ("rep_pen", "repetition_penalty"),
                ("stop_sequence", "stop"),
                ("max_length", "max_tokens"),
            ):
                if alias in data and data.get(name) is None:
                    data[name] = data.pop(alias)
        return data


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    continue_final_message: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class TokenEncodeRequest(Lenient):
    text: str | list[Message]
    add_bos_token: bool = True
    encode_special_tokens: bool = True  # a string's special-token spellings become specials (TabbyAPI's default)


class TokenDecodeRequest(Lenient):
    tokens: list[int] = Field(max_length=1_000_000)
    skip_special_tokens: bool = True


class ModelLoadRequest(Lenient):
    model_name: str = Field(min_length=1, max_length=255)
    backend: str | None = None
    max_seq_len: int | None = Field(default=None, ge=16)
    cache_mode: str | None = None
    gpu_split_auto: bool | None = None
    gpu_split: list[float] | None = None
    vision: bool | None = None


# --- responses -----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()
    prompt_time: float = 0.0  # TabbyAPI's timing fields
    completion_time: float = 0.0
    total_time: float = 0.0
    prompt_tokens_per_sec: float = 0.0
    completion_tokens_per_sec: float = 0.0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    index: int | None = None
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    stop_str: str | None = None  # TabbyAPI: which stop string ended it


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pixtral-exl2"
    parameters: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenEncodeResponse(BaseModel):
    tokens: list[int]
    length: int


class TokenDecodeResponse(BaseModel):
    text: str


class LoadProgress(BaseModel):
    model_type: Literal["model"] = "model"
    module: int
    modules: int
    status: Literal["processing", "finished"]


class Health(BaseModel):
    status: Literal["healthy", "unhealthy"]
    issues: list[str] = Field(default_factory=list)
    model_loaded: bool


class Props(BaseModel):
    total_slots: int
    chat_template: str
    default_generation_settings: dict[str, Any]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
