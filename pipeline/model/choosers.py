"""The token choosers of the gradient ascent: what the optimiser moves, and which tokens it stands for.

* ``GumbelChooser``: the original's logits over the vocabulary, hard Gumbel-softmax samples with a
  straight-through gradient, Adam (the sample and its backward fused with ``torch.compile`` on CUDA);
* ``PezChooser``: PEZ's continuous embeddings projected to the nearest token each step, AdamW.

Each chooser gives the step's token embeddings ``[B, C, K, W]`` (``embed``) and the chosen tokens'
positions in the table (``choice``); every image draws from its own generator.
"""

from __future__ import annotations

import functools
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F


def gumbel_sample(logits: torch.Tensor, uniform: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard Gumbel-softmax over the last dimension from uniform noise: ``z = logits - log(-log(u))``;
    returns the chosen positions ``argmax z`` and the soft sample ``softmax(z / tau)``."""
    z = logits - torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
    return z.argmax(-1), torch.softmax(z / tau, -1)


def gumbel_grad(g: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The straight-through gradient to the logits, ``scale * y * (g - <g, y>)``, from
    ``g = table @ grad`` (``scale`` holds ``1 / tau`` and any factor ``g`` was computed under)."""
    gy = g.to(y.dtype) * y
    return (gy - y * gy.sum(-1, keepdim=True)) * scale


def _gumbel_sample_in_place(logits: torch.Tensor, uniform: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``gumbel_sample`` in the ``uniform`` buffer, with no temporary of its size (for eager runs,
    where each of the functional form's passes would allocate one)."""
    z = uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_().log_().neg_().add_(logits)
    return z.argmax(-1), z.div_(tau).softmax(-1)


def _gumbel_grad_in_place(g: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``gumbel_grad`` in ``g``'s buffer (which it may take over when it has ``y``'s dtype)."""
    g = g.to(y.dtype).mul_(y)
    dot = g.sum(-1, keepdim=True)
    return g.addcmul_(y, dot, value=-1).mul_(scale)


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, which fuses its passes over the vocabulary-sized tensors into one or
    two; if compiling fails (no toolchain for this device), a warning and ``fn`` as it is."""
    state = {"fn": torch.compile(fn)}

    def run(*args):
        try:
            return state["fn"](*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001  (any failure of the compiler stack)
            if state["fn"] is fn:
                raise
            warnings.warn(f"ascend: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running {fn.__name__} uncompiled")
            state["fn"] = fn
            return fn(*args)
    return run


COMPILE_ON_CUDA = True  # fuse the Gumbel passes with torch.compile on CUDA; elsewhere they run in place


@functools.cache
def _gumbel_kernels(compiled: bool) -> tuple[Callable, Callable]:
    """The Gumbel forward and backward passes: compiled from the functional forms, or in place."""
    if compiled:
        return _compiled(gumbel_sample), _compiled(gumbel_grad)
    return _gumbel_sample_in_place, _gumbel_grad_in_place


class _GumbelStraightThrough(torch.autograd.Function):
    """Hard Gumbel-softmax sample, embedded, with the straight-through gradient, in few passes.

    Forward: the embedding rows of ``argmax z``, which equal ``one_hot(argmax z) @ table`` exactly.
    Backward: the gradient of ``softmax(z / tau) @ table`` with respect to ``logits``, as
    ``torch.nn.functional.gumbel_softmax(hard=True)`` gives it. Its one product with the table
    runs in ``fast_table``'s dtype, on the incoming gradient scaled to a largest entry of 1 in each
    row so that half precision neither overflows nor loses the small entries.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, uniform: torch.Tensor, table: torch.Tensor, fast_table: torch.Tensor, tau: float):
        sample, grad_of = _gumbel_kernels(logits.device.type == "cuda" and COMPILE_ON_CUDA)
        idx, y = sample(logits, uniform, tau)  # [..., K], [..., K, V']
        ctx.save_for_backward(y, fast_table)
        ctx.tau, ctx.grad_of = tau, grad_of
        ctx.mark_non_differentiable(idx)
        return table[idx], idx

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_idx):
        y, fast_table = ctx.saved_tensors
        # Scaled per row, so that no image's arithmetic depends on what it was batched with.
        peak = grad.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(grad.dtype).tiny)  # [..., K, 1]
        g = ((grad / peak).to(fast_table.dtype).reshape(-1, fast_table.shape[1]) @ fast_table.T).view(y.shape)
        return ctx.grad_of(g, y, peak / ctx.tau), None, None, None, None


@functools.cache
def _noise_pool() -> ThreadPoolExecutor:
    """Threads that draw the images' noise side by side on the CPU (torch releases the GIL)."""
    return ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="ascend-noise")


class GumbelChooser:
    """The original's optimiser: logits over the vocabulary, hard Gumbel-softmax samples, Adam."""

    def __init__(self, table: torch.Tensor, gens: list[torch.Generator], candidates: int, tokens: int, tau: float,
                 lr: float, fast: torch.dtype):
        self.table, self.gens, self.tau = table, gens, tau
        self.fast_table = table.to(fast)  # for the backward's product with the table
        dev = table.device
        self.logits = torch.stack([torch.randn(candidates, tokens, table.shape[0], generator=g, device=dev)
                                   for g in gens]).requires_grad_(True)  # [B, C, K, V']
        self.noise = torch.empty_like(self.logits)
        self.opt = torch.optim.Adam([self.logits], lr=lr, fused=True)

    def embed(self) -> torch.Tensor:
        """This step's token embeddings ``[B, C, K, W]``, differentiable to the logits."""
        def draw(b: int) -> None:  # image b's uniform noise, from its own generator
            self.noise[b].uniform_(generator=self.gens[b])

        with torch.no_grad():
            if self.noise.device.type == "cpu" and len(self.gens) > 1:
                list(_noise_pool().map(draw, range(len(self.gens))))  # a generator draws serially: one thread each
            else:
                for b in range(len(self.gens)):
                    draw(b)
        emb, _ = _GumbelStraightThrough.apply(self.logits, self.noise, self.table, self.fast_table, self.tau)
        return emb

    @torch.no_grad()
    def choice(self) -> torch.Tensor:
        """Positions in the table of the current tokens ``[B, C, K]``."""
        return self.logits.argmax(-1)


class PezChooser:
    """PEZ (Wen et al. 2023, "Hard Prompts Made Easy", arXiv:2302.03668): continuous embeddings,
    projected each step to the nearest token embedding (cosine), with the gradient of the
    projected prompt applied straight through to the continuous one, and AdamW."""

    def __init__(self, table: torch.Tensor, gens: list[torch.Generator], candidates: int, tokens: int, lr: float,
                 weight_decay: float):
        self.table = table
        self.unit = F.normalize(table.float(), dim=-1)  # [V', W]
        dev = table.device
        start = torch.stack([torch.randint(table.shape[0], (candidates, tokens), generator=g, device=dev) for g in gens])
        self.emb = table[start].float().clone().requires_grad_(True)  # [B, C, K, W], starts on random tokens
        self.opt = torch.optim.AdamW([self.emb], lr=lr, weight_decay=weight_decay)

    def embed(self) -> torch.Tensor:
        hard = self.table[self.choice()].to(self.emb.dtype)
        return self.emb + (hard - self.emb).detach()  # forward: the projected tokens; backward: to the soft ones

    @torch.no_grad()
    def choice(self) -> torch.Tensor:
        return (F.normalize(self.emb, dim=-1) @ self.unit.T).argmax(-1)  # [B, C, K]
