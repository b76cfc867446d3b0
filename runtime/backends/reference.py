"""The reference backend: our PixtralModel in plain PyTorch, on any device (the CPU included).

EXL2 tiers are run with every linear dequantized exactly as exllamav2 reconstructs it (fp16, bit
for bit) and cast to the compute dtype, so this is both how a user without a GPU runs a tier and the
numerical oracle for the CUDA backend. An fp16/bf16 source directory runs the same way.

Memory: every weight in the compute dtype (fp32 on the CPU by default, so 4 bytes per parameter:
Pixtral-12B ≈ 51 GB, bf16 ≈ 25 GB) plus the KV cache, 2·layers·kv_heads·head_dim·bytes per token
(12B in bf16: 160 KiB per token), grown as the conversation grows. One sequence at a time: requests
queue on a lock. The cache keeps the last conversation, so a follow-up turn re-runs only what is new,
and image features are kept by content hash (an LRU), so a picture is encoded once.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from pixtral.device import resolve_device
from pixtral.kv_cache import KVCache, kv_bytes_per_token
from pixtral.model import load_model
from pixtral.prompt import Prompt, PromptImage
from runtime.backends.base import (
    Backend,
    GenerationRequest,
    ImageCache,
    PrefillStats,
    TokenStep,
    TokenStream,
    encode_images,
)
from runtime.sampling import next_token

IMAGE_CACHE_SIZE = 32  # projected features of this many pictures stay in memory


def common_prefix(a: list[Hashable], b: list[Hashable]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.float16)
        self.model = load_model(model_dir, self.dtype, self.device, progress=progress)
        self.cfg = self.model.cfg
        context = self.cfg.text.max_position_embeddings
        self.max_seq_len = min(max_seq_len or context, context)
        self.has_vision = self.model.has_vision
        self.cache = KVCache(self.cfg.text, self.max_seq_len, self.dtype, self.device)
        self._cached_keys: list[Hashable] = []  # what the cache's positions hold
        self._features: ImageCache[Tensor] = ImageCache(IMAGE_CACHE_SIZE)  # image hash -> [patches, hidden]
        self._lock = threading.Lock()

    # --- images ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def image_features(self, images: list[PromptImage]) -> tuple[dict[str, Tensor], int]:
        """Features of each image by hash; the ones not cached run in one block-diagonal pass.
        Returns them and how many pictures were encoded."""
        features, encoded = self._features.lookup(
            images, lambda missing: [f.to(self.dtype) for f in encode_images(self.model, missing, self.device)]
        )
        return {image.key: rows for image, rows in zip(images, features)}, encoded

    def _embed(self, prompt: Prompt, keys: list[Hashable], start: int) -> tuple[Tensor, int]:
        """Input embeddings of positions start.. [1, T, hidden], image features at `[IMG]` positions."""
        ids = torch.tensor(prompt.token_ids[start:], device=self.device)[None]
        embeds = self.model.language_model.model.embed_tokens(ids)
        image_positions = [(i, key) for i, key in enumerate(keys[start:]) if isinstance(key, tuple)]
        if not image_positions:
            return embeds, 0
        needed = [image for image in prompt.images if any(k[0] == image.key for _, k in image_positions)]
        features, encoded = self.image_features(needed)
        rows = torch.stack([features[image_key][patch] for _, (image_key, patch) in image_positions])
        embeds[0, [i for i, _ in image_positions]] = rows.to(embeds.dtype)
        return embeds, encoded

    # --- generation -----------------------------------------------------------------------------

    def stream(self, request: GenerationRequest) -> TokenStream:
        stats = PrefillStats(prompt_tokens=len(request.prompt))
        return TokenStream(self._generate(request, stats), stats)

    @torch.inference_mode()
    def _generate(self, request: GenerationRequest, stats: PrefillStats) -> Iterator[TokenStep]:
        prompt, lm = request.prompt, self.model.language_model
        with self._lock:
            started = time.perf_counter()
            keys = prompt.position_keys(self.cfg.image_token_index)
            # the last position is re-run for its logits
            reused = min(common_prefix(self._cached_keys, keys), len(keys) - 1)
            self.cache.truncate(reused)
            self._cached_keys = self._cached_keys[:reused]
            embeds, stats.images_encoded = self._embed(prompt, keys, reused)
            logits = lm(embeds, reused, self.cache, last_only=True)[0, -1]
            self._cached_keys = keys
            stats.cached_tokens, stats.seconds = reused, time.perf_counter() - started
            seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
            generator = torch.Generator(self.device).manual_seed(seed)
            history = list(prompt.token_ids)
            for step in range(request.max_new_tokens):
                token = next_token(logits, history, request.sampling, generator)
                yield self._step(logits, token, request)
                history.append(token)
                if (
                    token in request.stop_token_ids
                    or step + 1 == request.max_new_tokens
                    or len(self._cached_keys) >= self.max_seq_len
                ):
                    return
                embeds = lm.model.embed_tokens(torch.tensor([[token]], device=self.device))
                logits = lm(embeds, len(self._cached_keys), self.cache)[0, -1]
                self._cached_keys.append(token)

    @staticmethod
    def _step(logits: Tensor, token: int, request: GenerationRequest) -> TokenStep:
        if not request.want_logprobs:
            return TokenStep(token)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        top = ()
        if request.logprobs:
            values, ids = torch.topk(log_probs, request.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return TokenStep(token, float(log_probs[token]), top)

    @torch.inference_mode()
    def logits(self, prompt: Prompt) -> Tensor:
        with self._lock:
            keys = prompt.position_keys(self.cfg.image_token_index)
            embeds, _ = self._embed(prompt, keys, 0)
            return self.model.language_model(embeds)[0].float().cpu()

    @torch.inference_mode()
    def logits_at(self, items: list[tuple[Prompt, list[int]]], batch: int = 32) -> list[Tensor]:
        """Batched: prompts right-padded into one forward pass each `batch` (causal attention keeps
        padding out of every real position), the head run on the asked positions only."""
        out: list[Tensor] = []
        lm = self.model.language_model
        with self._lock:
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                rows = [
                    self._embed(prompt, prompt.position_keys(self.cfg.image_token_index), 0)[0][0]
                    for prompt, _ in chunk
                ]
                width = max(r.shape[0] for r in rows)
                x = torch.stack([torch.cat([r, r.new_zeros(width - r.shape[0], r.shape[1])]) for r in rows])
                hidden = lm.hidden_states(x)
                for b, (_, positions) in enumerate(chunk):
                    out.append(lm.lm_head(hidden[b, positions]).float().cpu())
        return out

    def memory(self) -> dict[str, int]:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {
            "weights": weights,
            "kv_cache": self.cache.nbytes(),
            "kv_per_token": kv_bytes_per_token(self.cfg.text, self.dtype.itemsize * 8),
        }

    def close(self) -> None:
        with self._lock:
            self.model, self.cache = None, None  # type: ignore[assignment]
            self._features.clear()
