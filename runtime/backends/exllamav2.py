"""The exllamav2 backend (CUDA): exllamav2 0.3.2 runs the EXL2 decoder; the vision path is ours.

exllamav2 is imported here only, when this backend is built: it cannot be imported without CUDA.
Its dynamic generator batches every active job, so concurrent requests run together; one worker
thread owns the generator (it is not thread-safe) and hands each job's results to that job's queue.

Images (../shared/spec/exl2-format.md §5.3–§5.5): our fp16 vision tower and projector encode the
picture, and one embedding block per image is laid out exactly as mistral-common's tokens —
projected features at the `[IMG]` positions, the text-embedding rows of `[IMG_BREAK]`/`[IMG_END]` at
theirs — and handed to exllamav2 as an `ExLlamaV2MMEmbedding`. exllamav2's own Pixtral processor
(32-px rounding, an extra `[IMG_BREAK]`) is never used. Embedding objects are kept by image hash, so
a later turn reuses the same token-id range and the generator's page cache hits on it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pixtral.config import load_config
from pixtral.errors import OptionError, UserError
from pixtral.kv_cache import kv_bytes_per_token
from pixtral.model import PixtralModel, load_module
from pixtral.prompt import Prompt, PromptImage
from pixtral.tokenizer import PixtralTokenizer
from pixtral.weights import Checkpoint
from runtime.backends.base import (
    Backend,
    GenerationRequest,
    ImageCache,
    PrefillStats,
    TokenStep,
    TokenStream,
    encode_images,
)
from runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

CACHE_MODES = ("FP16", "Q8", "Q6", "Q4")
IMAGE_CACHE_SIZE = 32
PAGE = 256  # exllamav2's cache granularity


def exllamav2_available() -> bool:
    """exllamav2 can run here: it is installed, and CUDA is present or its extension is already
    loaded (a prebuilt one, or the tests' CPU stand-in). Without either, importing it would start a
    CUDA compile that cannot succeed."""
    has_extension = torch.cuda.is_available() or "exllamav2_ext" in sys.modules
    return has_extension and importlib.util.find_spec("exllamav2") is not None


class ExLlamaV2Backend(Backend):
    name = "exllamav2"

    def __init__(
        self,
        model_dir: str | Path,
        max_seq_len: int | None = None,
        cache_mode: str = "FP16",
        gpu_split: list[float] | None = None,
        max_batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        if cache_mode.upper() not in CACHE_MODES:
            raise OptionError(f"cache mode: expected one of {', '.join(CACHE_MODES)}, got {cache_mode!r}")
        if not exllamav2_available():
            raise OptionError("the exllamav2 backend needs a CUDA GPU; use --backend reference")
        import exllamav2 as ex  # compiles its extension on first use
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        self.ex, self.cache_mode = ex, cache_mode.upper()
        self.cfg = load_config(model_dir)
        config = ex.ExLlamaV2Config(str(model_dir))
        self.attention = attention_path(config)
        log.info("exllamav2 attention: %s", self.attention)
        context = min(max_seq_len or self.cfg.text.max_position_embeddings, self.cfg.text.max_position_embeddings)
        self.max_seq_len = config.max_seq_len = math.ceil(context / PAGE) * PAGE if context % PAGE else context
        self.model = ex.ExLlamaV2(config)
        cache_class = {
            "FP16": ex.ExLlamaV2Cache,
            "Q8": ex.ExLlamaV2Cache_Q8,
            "Q6": ex.ExLlamaV2Cache_Q6,
            "Q4": ex.ExLlamaV2Cache_Q4,
        }
        if gpu_split:
            self.model.load(gpu_split=list(gpu_split), callback=progress)
            self.cache = cache_class[cache_mode.upper()](self.model, max_seq_len=self.max_seq_len)
        else:
            self.cache = cache_class[cache_mode.upper()](self.model, max_seq_len=self.max_seq_len, lazy=True)
            self.model.load_autosplit(self.cache, callback=progress)
        self.device = torch.device(self.model.modules[1].device())  # the first decoder layer's: the vision runs there
        self.tokenizer = ex.ExLlamaV2Tokenizer(config)
        # unpaged (batch 1, as TabbyAPI's compatibility mode) unless flash-attn has paged attention
        self.batches = self.attention.startswith("flash-attn")
        self.generator = ExLlamaV2DynamicGenerator(
            self.model, self.cache, self.tokenizer, max_batch_size=max_batch_size, paged=self.batches
        )
        self._load_vision(Path(model_dir))
        self._embeddings: ImageCache[Any] = ImageCache(IMAGE_CACHE_SIZE)  # image hash -> ExLlamaV2MMEmbedding
        self._commands: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="exllamav2-generator", daemon=True)
        self._worker.start()

    # --- vision ---------------------------------------------------------------------------------

    def _load_vision(self, model_dir: Path) -> None:
        """Our fp16 vision tower + projector on the first GPU, and the text rows of the markers."""
        device = self.device
        with torch.device("meta"):
            model = PixtralModel(self.cfg)
        with Checkpoint(model_dir) as ckpt:
            self.has_vision = "vision_tower.patch_conv.weight" in ckpt
            if self.has_vision:
                load_module(model.vision_tower, ckpt, "vision_tower.", torch.float16, device)
                load_module(model.multi_modal_projector, ckpt, "multi_modal_projector.", torch.float16, device)
                # the text rows of the markers, as exllamav2's own (fp16, CPU) embedding table holds them
                table = ckpt.get("language_model.model.embed_tokens.weight")
                ids = PixtralTokenizer(model_dir).image_ids
                self._break_row, self._end_row = table[ids.img_break].half().clone(), table[ids.img_end].half().clone()
                del table
        self.vision = model if self.has_vision else None

    @torch.no_grad()
    def _image_embeddings(self, images: tuple[PromptImage, ...]) -> tuple[list[Any], int]:
        """One ExLlamaV2MMEmbedding per image (cached by hash); new ones in one block-diagonal pass."""
        from exllamav2.generator import ExLlamaV2MMEmbedding

        def encode(missing: list[PromptImage]) -> list[Any]:
            assert self.vision is not None
            features = encode_images(self.vision, missing, self.device)
            return [
                ExLlamaV2MMEmbedding(
                    self.model, layout_block(rows.half().cpu(), image.grid, self._break_row, self._end_row)
                )
                for image, rows in zip(missing, features)
            ]

        return self._embeddings.lookup(images, encode)

    def _input_ids(self, prompt: Prompt) -> tuple[Tensor, list[Any], int]:
        """Prompt ids with each image's token span replaced by its embedding's id range."""
        prompt.position_keys(self.cfg.image_token_index)  # [IMG] counts must match the images' grids
        embeddings, encoded = self._image_embeddings(prompt.images)
        ids, image_token, spans = list(prompt.token_ids), self.cfg.image_token_index, iter(embeddings)
        out, i = [], 0
        while i < len(ids):
            if ids[i] == image_token:
                embedding = next(spans)
                out += embedding.get_ids()
                i += embedding.length  # [IMG]s, breaks and end: exactly the span mistral-common laid out
            else:
                out.append(ids[i])
                i += 1
        return torch.tensor([out], dtype=torch.long), embeddings, encoded

    # --- the generator's thread -----------------------------------------------------------------

    def _loop(self) -> None:
        sinks: dict[Any, queue.Queue] = {}
        while True:
            block = not self.generator.num_remaining_jobs()
            try:
                while True:
                    command = self._commands.get(block=block)
                    block = False
                    kind, payload = command
                    if kind == "stop":
                        return
                    if kind == "add":
                        job, sink = payload
                        sinks[job] = sink
                        self.generator.enqueue(job)
                    elif kind == "cancel" and payload in sinks:
                        self.generator.cancel(payload)
                        sinks.pop(payload)
                    elif kind == "call":
                        fn, future = payload
                        try:
                            future.set_result(fn())
                        except BaseException as err:  # handed to the caller's thread
                            future.set_exception(err)
            except queue.Empty:
                pass
            if not self.generator.num_remaining_jobs():
                continue
            try:
                results = self.generator.iterate()
            except Exception as err:  # a generator failure ends every job with the error
                for sink in sinks.values():
                    sink.put(err)
                sinks.clear()
                continue
            for result in results:
                sink = sinks.get(result["job"])
                if sink is not None:
                    sink.put(result)
                    if result.get("eos"):
                        sinks.pop(result["job"], None)

    def _call(self, fn: Callable[[], Any]) -> Any:
        future: Future = Future()
        self._commands.put(("call", (fn, future)))
        return future.result()

    # --- Backend --------------------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> TokenStream:
        from exllamav2.generator import ExLlamaV2DynamicJob

        stats = PrefillStats(prompt_tokens=len(request.prompt))
        input_ids, embeddings, stats.images_encoded = self._call(lambda: self._input_ids(request.prompt))
        job = ExLlamaV2DynamicJob(
            input_ids=input_ids,
            max_new_tokens=request.max_new_tokens,
            gen_settings=sampler_settings(request.sampling),
            seed=request.sampling.seed,
            stop_conditions=sorted(request.stop_token_ids),
            embeddings=embeddings,
            return_probs=request.want_logprobs,
            return_top_tokens=request.logprobs,
            decode_special_tokens=True,
        )
        sink: queue.Queue = queue.Queue()
        self._commands.put(("add", (job, sink)))
        return TokenStream(self._results(job, sink, stats), stats)

    def _results(self, job: Any, sink: queue.Queue, stats: PrefillStats) -> Iterator[TokenStep]:
        finished = False
        try:
            while not finished:
                result = sink.get()
                if isinstance(result, Exception):
                    raise UserError(f"exllamav2 generator failed: {result}") from result
                finished = bool(result.get("eos"))
                if finished:
                    stats.cached_tokens = int(result.get("cached_tokens", 0))
                    stats.seconds = float(result.get("time_prefill", 0.0))
                yield from _steps(result)
        finally:
            if not finished:
                self._commands.put(("cancel", job))

    def logits(self, prompt: Prompt) -> Tensor:
        def run() -> Tensor:
            input_ids, embeddings, _ = self._input_ids(prompt)
            cache = self.ex.ExLlamaV2Cache(self.model, max_seq_len=math.ceil(len(prompt) / PAGE) * PAGE)
            chunks = [
                self.model.forward(input_ids[:, i : i + 2048], cache, indexed_embeddings=embeddings).float().cpu()
                for i in range(0, input_ids.shape[1], 2048)
            ]
            return torch.cat(chunks, dim=1)[0]

        return self._call(run)

    def memory(self) -> dict[str, int]:
        """exllamav2 allocates the whole cache at load: kv_cache = kv_per_token · max_seq_len."""
        per_token = kv_bytes_per_token(self.cfg.text, {"FP16": 16, "Q8": 8, "Q6": 6, "Q4": 4}[self.cache_mode])
        allocated = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
        return {
            "weights": max(allocated - per_token * self.max_seq_len, 0),
            "kv_cache": per_token * self.max_seq_len,
            "kv_per_token": per_token,
        }

    def healthy(self) -> bool:
        return self._worker.is_alive()

    def close(self) -> None:
        self._commands.put(("stop", None))
        self._worker.join(timeout=30)
        self.model.unload()
        self.vision = None
        self._embeddings.clear()
        torch.cuda.empty_cache()


def layout_block(features: Tensor, grid: tuple[int, int], img_break: Tensor, img_end: Tensor) -> Tensor:
    """mistral-common's image span as embedding rows: per patch row, the row's features then the
    `[IMG_BREAK]` text row; the last break is `[IMG_END]`. [rows·(cols+1), hidden]."""
    rows, cols = grid
    grid_features = features.reshape(rows, cols, -1)
    markers = img_break.expand(rows, 1, -1).clone()
    markers[-1, 0] = img_end
    return torch.cat([grid_features, markers.to(grid_features.dtype)], dim=1).reshape(rows * (cols + 1), -1)


def sampler_settings(params: SamplingParams) -> Any:
    """Our SamplingParams as exllamav2's sampler settings (its 'off' values differ: top_p/typical 0)."""
    from exllamav2.generator import ExLlamaV2Sampler

    if params.greedy:
        return ExLlamaV2Sampler.Settings.greedy(
            token_repetition_penalty=params.repetition_penalty,
            token_presence_penalty=params.presence_penalty,
            token_frequency_penalty=params.frequency_penalty,
            token_repetition_range=params.penalty_range or -1,
        )
    return ExLlamaV2Sampler.Settings(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=0.0 if params.top_p >= 1.0 else params.top_p,
        min_p=params.min_p,
        typical=0.0 if params.typical >= 1.0 else params.typical,
        token_repetition_penalty=params.repetition_penalty,
        token_presence_penalty=params.presence_penalty,
        token_frequency_penalty=params.frequency_penalty,
        token_repetition_range=params.penalty_range or -1,
    )


def attention_path(config: Any) -> str:
    """Which attention exllamav2 will run, set on its config: paged flash-attn (≥ 2.5.7) when it
    imports; else xformers; else torch with an explicit causal mask (`no_sdpa`), because
    exllamav2 0.3.2's SDPA branch passes no mask for ordinary causal prompts (attn.py `_attn_torch`:
    `get_block_diag_mask()` is None there), so its prefill would attend to later tokens."""
    from exllamav2 import attn

    if attn.has_flash_attn_with_paged and not config.no_flash_attn:
        return "flash-attn (paged)"
    if attn.has_flash_attn and not config.no_flash_attn:  # 2.2.1 <= flash-attn < 2.5.7: causal, not paged
        return "flash-attn < 2.5.7 (unpaged, batch 1; >= 2.5.7 batches)"
    if attn.has_xformers and not config.no_xformers:
        return "xformers (unpaged, batch 1)"
    config.no_sdpa = True
    return "torch matmul with causal mask (unpaged, batch 1; install flash-attn >= 2.5.7 for batching)"


def _steps(result: dict[str, Any]) -> Iterator[TokenStep]:
    """TokenSteps of one streaming result (probabilities are exllamav2's, after its sampling filters).
    A stop token ends a job without appearing in `token_ids` (generator/dynamic.py emits it only as
    `eos_triggering_token_id`); it is yielded as the last step, as every backend yields it."""
    yield from _sampled_steps(result)
    if result.get("eos") and result.get("eos_reason") == "stop_token":
        yield TokenStep(int(result["eos_triggering_token_id"]))


def _sampled_steps(result: dict[str, Any]) -> Iterator[TokenStep]:
    ids = result.get("token_ids")
    if ids is None:
        return
    probs = result.get("token_probs")
    top_ids, top_probs = result.get("top_k_tokens"), result.get("top_k_probs")
    for i, token in enumerate(ids[0].tolist()):
        logprob = math.log(max(float(probs[0, i]), 1e-30)) if probs is not None else None
        top = ()
        if top_ids is not None:
            top = tuple(
                (int(t), math.log(max(float(p), 1e-30)))
                for t, p in zip(top_ids[0, i].tolist(), top_probs[0, i].tolist())
            )
        yield TokenStep(int(token), logprob, top)
