"""Re-implementations of the original ClipCap loops, used as the benchmarks' baselines.

Written from the behaviour described in docs (the original papers' repositories), not copied:
  * greedy_generate2      batch 1, no KV cache: the whole sequence is re-run every step, the
                          last position's logits pass a top-p 0.8 filter, the argmax is appended,
                          stop at the stop token or after 67 tokens.
  * beam_generate         the original beam search: batch 1, beam 5, no KV cache, summed log-probs
                          ranked by length-normalised score, finished beams extend with a
                          zero-cost pad token (id 0), ordered by normalised score at the end.
  * ReferenceTrainer      the original trainer: fp32, every caption padded to one global length
                          (min(mean + 10*std, max)), the LM's weight gradients computed even when
                          only the mapper is trained (only the optimizer skips them), a plain
                          DataLoader with no worker processes, AdamW + linear warm-up schedule.
  * encode_per_caption    the original parse_coco: one image decode + encode per caption, batch 1,
                          everything kept in memory.
Nothing here is product code; prefixcap must beat these, not reuse them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ENTRY_LENGTH = 67  # the original inference's token budget
TOP_P = 0.8


# --- inference ---------------------------------------------------------------------------------
def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set whose probability mass exceeds top_p.

    The most likely token is always kept, so this cannot change the argmax; the original ran it
    anyway and so does the reference (its cost is part of the original loop).
    """
    ordered, order = torch.sort(logits, descending=True)  # (1, V)
    mass = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1)
    drop = mass > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses the threshold
    drop[..., 0] = False
    logits = logits.clone()
    logits[:, order[drop]] = float("-inf")
    return logits


@torch.no_grad()
def greedy_generate2(lm: nn.Module, prefix: torch.Tensor, stop_token: int,
                     entry_length: int = ENTRY_LENGTH, top_p: float = TOP_P) -> list[int]:
    """Original greedy decoding for ONE image. prefix (1, K, D) -> generated token ids (stop included)."""
    embed = lm.get_input_embeddings()
    sequence = prefix  # (1, K + t, D), grows by one each step
    out: list[int] = []
    for _ in range(entry_length):
        logits = lm(inputs_embeds=sequence).logits[:, -1, :]  # whole sequence, no cache; (1, V)
        logits = _top_p_filter(logits, top_p)
        token = torch.argmax(logits, dim=-1, keepdim=True)  # (1, 1)
        out.append(int(token.item()))
        sequence = torch.cat((sequence, embed(token)), dim=1)
        if out[-1] == stop_token:
            break
    return out


@torch.no_grad()
def beam_generate(lm: nn.Module, prefix: torch.Tensor, stop_token: int, beam_size: int = 5,
                  entry_length: int = ENTRY_LENGTH, pad_token: int = 0) -> list[tuple[list[int], float]]:
    """Original beam search for ONE image. prefix (1, K, D) -> [(tokens, normalised score)] best first."""
    embed = lm.get_input_embeddings()
    sequence = prefix  # (1 then beam, K + t, D)
    beams: torch.Tensor | None = None  # (beam, t) token ids
    totals: torch.Tensor | None = None  # (beam,) summed log-probabilities
    lengths = torch.ones(beam_size, device=prefix.device)  # tokens per beam, counting until it stopped
    finished = torch.zeros(beam_size, dtype=torch.bool, device=prefix.device)
    for _ in range(entry_length):
        logprobs = lm(inputs_embeds=sequence).logits[:, -1, :].softmax(-1).log()  # (1 or beam, V)
        if totals is None:
            # First step: the beam_size best first tokens seed the beams.
            totals, first = logprobs.topk(beam_size, dim=-1)  # (1, beam)
            totals, new_tokens = totals[0], first.T  # (beam,), (beam, 1)
            sequence = sequence.expand(beam_size, *sequence.shape[1:])
            beams = new_tokens
        else:
            # A finished beam may only continue with the pad token, at no cost.
            logprobs[finished] = float("-inf")
            logprobs[finished, pad_token] = 0.0
            candidate = totals[:, None] + logprobs  # (beam, V)
            lengths[~finished] += 1
            normalised = candidate / lengths[:, None]
            best, flat = normalised.view(-1).topk(beam_size, dim=-1)
            source = torch.div(flat, candidate.shape[1], rounding_mode="floor")
            new_tokens = (flat % candidate.shape[1]).unsqueeze(1)  # (beam, 1)
            lengths = lengths[source]
            beams = torch.cat((beams[source], new_tokens), dim=1)
            sequence = sequence[source]
            totals = best * lengths
            finished = finished[source]
        sequence = torch.cat((sequence, embed(new_tokens.view(-1)).unsqueeze(1)), dim=1)
        finished = finished | new_tokens.view(-1).eq(stop_token)
        if bool(finished.all()):
            break
    normalised = totals / lengths
    ranking = normalised.argsort(descending=True)
    return [(beams[i, :int(lengths[i])].tolist(), float(normalised[i])) for i in ranking]


# --- training ----------------------------------------------------------------------------------
def global_pad_length(lengths: Sequence[int]) -> int:
    """The original rule: every caption padded to min(mean + 10*std, max) tokens."""
    arr = np.asarray(lengths, dtype=np.float64)
    return int(min(int(arr.mean() + 10 * arr.std()), int(arr.max())))


class PaddedCaptionDataset(torch.utils.data.Dataset):
    """All captions and their image vectors held in memory, each padded to one global length."""

    def __init__(self, tokens: list[np.ndarray], embeddings: np.ndarray, prefix_length: int):
        self.tokens = [torch.as_tensor(np.asarray(t, dtype=np.int64)) for t in tokens]
        self.embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))  # (N, C)
        self.prefix_length = prefix_length
        self.max_len = global_pad_length([len(t) for t in self.tokens])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        t = self.tokens[i][: self.max_len]
        padded = torch.zeros(self.max_len, dtype=torch.int64)
        padded[: len(t)] = t
        mask = torch.zeros(self.max_len)
        mask[: len(t)] = 1
        mask = torch.cat((torch.ones(self.prefix_length), mask))  # (K + T,) the prefix is always attended
        return padded, mask, self.embeddings[i]


class ReferenceCaptioner(nn.Module):
    """The original model class: a mapper and the LM; the LM's weights always require grad."""

    def __init__(self, lm: nn.Module, mapper: nn.Module, prefix_length: int, only_prefix: bool):
        super().__init__()
        self.lm = lm
        self.mapper = mapper
        self.prefix_length = prefix_length
        self.only_prefix = only_prefix
        self.lm.requires_grad_(True)  # the original never switched them off

    def trainable(self) -> list[nn.Parameter]:
        """What the optimizer updates: the mapper only in prefix mode (autograd still does the LM)."""
        return list(self.mapper.parameters()) if self.only_prefix else list(self.parameters())

    def train(self, mode: bool = True) -> ReferenceCaptioner:
        super().train(mode)
        if self.only_prefix:
            self.lm.eval()
        return self

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        k = self.prefix_length
        token_embeds = self.lm.get_input_embeddings()(tokens)  # (B, T, D)
        prefix = self.mapper(embeddings).view(tokens.shape[0], k, -1)  # (B, K, D)
        logits = self.lm(inputs_embeds=torch.cat((prefix, token_embeds), dim=1), attention_mask=mask).logits
        # Logits at K-1 .. K+T-2 predict the T caption tokens; padding is excluded by the mask.
        logits = logits[:, k - 1:-1]  # (B, T, V), the LM head ran on every position incl. prefix
        targets = tokens.masked_fill(mask[:, k:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


@dataclass
class ReferenceTrainer:
    """The original training loop, timed per step."""

    model: ReferenceCaptioner
    dataset: PaddedCaptionDataset
    batch_size: int = 40
    lr: float = 2e-5
    warmup_steps: int = 5000
    seed: int = 0

    def run(self, steps: int, on_step: Callable[[int, float, float], None] | None = None) -> list[float]:
        """Train `steps` steps; returns each step's wall time in seconds."""
        import time

        from transformers import get_linear_schedule_with_warmup

        torch.manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                                             drop_last=True, num_workers=0)
        optimizer = torch.optim.AdamW(self.model.trainable(), lr=self.lr)
        scheduler = get_linear_schedule_with_warmup(optimizer, self.warmup_steps, num_training_steps=10**6)
        self.model.train()
        times: list[float] = []
        while len(times) < steps:
            start = time.perf_counter()
            for tokens, mask, emb in loader:
                optimizer.zero_grad()  # the optimizer's params only: the LM's grads just accumulate
                loss = self.model(tokens, mask, emb)
                loss.backward()
                optimizer.step()
                scheduler.step()
                now = time.perf_counter()
                times.append(now - start)
                if on_step:
                    on_step(len(times), loss.item(), now - start)
                start = now
                if len(times) >= steps:
                    break
        return times


# --- preprocessing -----------------------------------------------------------------------------
@torch.no_grad()
def encode_per_caption(pairs: Iterable[tuple[bytes, str]], preprocess: Callable, encode: Callable,
                       ) -> tuple[torch.Tensor, list[str], int]:
    """The original parse_coco: for every (image bytes, caption) pair decode, preprocess and encode
    the image alone (batch 1), so an image with five captions is encoded five times.

    Returns (embeddings (N_captions, C), captions, encoder forward passes).
    """
    from PIL import Image

    from prefixcap.data.images import to_rgb

    embeddings, captions, passes = [], [], 0
    for jpeg, caption in pairs:
        image = to_rgb(Image.open(io.BytesIO(jpeg)))
        pixels = torch.from_numpy(preprocess(image)).unsqueeze(0)  # (1, 3, H, W)
        embeddings.append(encode(pixels))
        passes += 1
        captions.append(caption)
    return torch.cat(embeddings), captions, passes
