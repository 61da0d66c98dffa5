"""The batch inference engine: prepacked + chunked prefill, paged KV cache, continuous batching.

One `Engine.run` loop, each iteration:
  1. admit waiting requests while a decode slot and enough pages (prompt + max_new_tokens) are
     free; pages are reserved up front, so a running request never stalls for memory;
  2. prefill under a token budget (`prefill_rows x prefill_tokens`): whole short prompts are
     bin-packed into rows (first-fit decreasing), long prompts advance one chunk per iteration
     against their cached prefix; a prompt whose last token is prefilled samples its first token
     (time to first token);
  3. one decode step for every slot that has finished prefill (decode-maximal batching: decodes
     run every iteration, prefill fills the rest of the budget);
  4. finished requests (eos, stop string, max_new_tokens) free their slot and pages and are
     reported at once through `on_result`.

Models: Llama family (paged per-head K/V, paged_cache.py + steps.py) and MLA models (paged
latent cache and absorbed decode, jaxprefill/mla/latent_cache.py; DeepSeek-V3.2 adds index-key
pages, jaxprefill/mla/dsa_cache.py; TPLA decode on a `tensor` axis with `EngineConfig.tpla`,
jaxprefill/mla/tpla_steps.py, for DeepSeek-V3.2 jaxprefill/mla/dsa_tpla_steps.py). Sparse
prefill (`EngineConfig.sparse`) applies per chunk and to prompts alone in a packed row
(jaxprefill/attention/sparse.py). A prefill step whose rows hold one prompt each runs as a plain
causal prompt forward (steps.prefill_single: no segment mask, the policies' whole-prompt
layouts); a step that packs two prompts into a row runs with segment ids (steps.prefill_packed).
Several devices: `EngineConfig.data_parallel` (data_parallel.py), or `Engine(..., mesh=)` with a
`sequence` axis of n > 1 devices: those single-prompt prefill steps run as ring attention over it
(jaxprefill/parallel, docs/context_parallel.md); every other step runs on replicated data and the
paged cache is whole on every device. A ring engine prefills each prompt whole in one row (no
chunked prefill): a prompt longer than `prefill_tokens` is refused.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxprefill.decoding import Sampling, context_for, encode_prompt, spec_graphdef
from jaxprefill.graph import FlatModel
from jaxprefill.generate import PromptTooLongError, cache_sharding
from jaxprefill.infer import steps
from jaxprefill.mla import dsa_cache, dsa_tpla_steps, latent_cache, tpla_steps
from jaxprefill.models import KVCache
from jaxprefill.models.deepseek import MLACache
from jaxprefill.models.dsa import DSACache
from jaxprefill.infer.config import EngineConfig
from jaxprefill.infer.paged_cache import SCRATCH_PAGE, PageAllocator, PagedKVCache
from jaxprefill.infer.scheduler import pack_rows
from jaxprefill.parallel import ContextParallel
from jaxprefill.parallel.rows import check_policy
from jaxprefill.sharding import state_shardings
from jaxprefill.validate import (InputError, check_id, check_prompt, check_prompt_list,
                                 check_sampling)


@dataclasses.dataclass
class Request:
    """One prompt to complete. Sampling fields left None take the engine config's defaults.
    Checked when the engine admits it (`Engine.prepare`): id a str or an int, the prompt and
    sampling fields as `jp.generate` requires (jaxprefill/validate.py)."""

    id: str | int
    prompt: str | list | None = None   # text, chat messages, or token ids
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] | None = None


@dataclasses.dataclass
class Result:
    id: str
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str      # eos | stop | length
    ttft_s: float           # submit -> first token
    decode_tok_s: float     # generated tokens after the first / their time

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(self.tokens), "finish_reason": self.finish_reason,
                "ttft_s": round(self.ttft_s, 4), "decode_tok_s": round(self.decode_tok_s, 2)}


@dataclasses.dataclass
class _Seq:
    """Engine-side state of an admitted request."""

    req: Request
    ids: np.ndarray  # int32 [prompt tokens]: copied into the step's arrays without a list walk
    max_new: int
    sampling: tuple  # (seed, temperature, top_p, top_k)
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    prefilled: int = 0
    out: list[int] = dataclasses.field(default_factory=list)
    t_submit: float = 0.0
    t_first: float | None = None
    finish: str | None = None


class Engine:
    """`Engine(model, tokenizer, config).generate(prompts)`; `run(requests, on_result)` streams.

    mesh: None (one device), or a `jp.make_mesh(sequence=n, ...)` mesh or a `ContextParallel`
      whose ring has n > 1 devices (a model built with a context setting brings its own): the
      parameters are laid out on the mesh by its rules, the paged cache is replicated on it, and
      prefill steps whose rows hold one prompt each run ring attention (`self.ring`).
    """

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(),
                 mesh: Mesh | ContextParallel | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        cfg = model.config
        self.ring = engine_ring(model, config, mesh)
        check_sampling(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                       top_p=config.top_p, top_k=config.top_k, seed=config.seed,
                       where="engine config")
        cache_class = getattr(model, "cache_class", KVCache)
        if cache_class is KVCache:  # Llama family: paged per-head K/V
            self.steps, pool = steps, PagedKVCache
        elif cache_class is MLACache:  # DeepSeek / Kimi: paged latent cache, absorbed decode
            self.steps, pool = latent_cache, latent_cache.PagedLatentCache
        elif cache_class is DSACache:  # DeepSeek-V3.2: latent + index-key pages, sparse MLA
            self.steps, pool = dsa_cache, dsa_cache.PagedDSACache
        else:
            raise NotImplementedError(f"the engine has no paged cache for {cache_class.__name__} "
                                      f"({type(model).__name__}): use jp.generate")
        if config.tpla is not None and cache_class not in (MLACache, DSACache):
            raise ValueError(f"tpla decode needs an MLA model (DeepSeek, Kimi, DeepSeek-V3.2), "
                             f"not {type(model).__name__}")
        self.max_seq_len = config.max_seq_len or cfg.max_position_embeddings
        # The same weights, an AttentionSpec with the policy and without any ring (the model's
        # own context setting runs in ring_graphdef only)
        fields = {} if config.sparse is None else {"sparse": config.sparse}
        if getattr(getattr(model, "attention", None), "context", None) is not None:
            fields["context"] = None
        if fields:
            self.graphdef = spec_graphdef(model, "the batch engine", **fields)
        if self.ring is not None:  # prefill_single through the ring
            self.ring_graphdef = spec_graphdef(model, "context parallelism",
                                               **{**fields, "context": self.ring})
        if config.tpla is not None:  # folded weights, latent pool sharded over `tensor`
            tpla = dsa_tpla_steps if cache_class is DSACache else tpla_steps
            model, self.steps, self.cache = tpla.setup(
                model, dict(config.tpla), config.num_pages, config.page_size)
        else:
            self.cache = pool.zeros(cfg, config.num_pages, config.page_size, model.dtype,
                                    **getattr(model, "cache_options", {}))
        graphdef, self.state = nnx.split(model)
        if not fields:
            self.graphdef = graphdef
        home = {d for leaf in jax.tree.leaves(self.state) for d in leaf.devices()}
        if self.ring is None and config.tpla is None and len(home) == 1:
            # Committed, as the step outputs that replace it are: an uncommitted first cache
            # would make the first step compile a program of its own (a second compile).
            self.cache = jax.device_put(self.cache, home.pop())
        if self.ring is not None:  # laid out as jp.generate does; the paged cache replicated
            self.state = jax.device_put(self.state, state_shardings(self.state, self.ring.mesh))
            self.cache = jax.device_put(self.cache,
                                        cache_sharding(self.cache, self.ring.mesh, None, cfg))
        self._flat = FlatModel()  # the graph and state as the steps take them, cheaply
        self.allocator = PageAllocator(config.num_pages)
        eos = tokenizer.eos_token_ids if tokenizer is not None else ()
        self.eos = set(eos or cfg.eos_token_ids)
        # packed_rows: rows of whole prompts; single_rows: those of them prefilled as a plain
        # causal prompt forward (no row of their step held two prompts: steps.prefill_single);
        # ring_rows: those of them prefilled through the ring (a mesh with a sequence axis)
        self.stats = {"prefill_calls": 0, "decode_calls": 0, "packed_rows": 0, "single_rows": 0,
                      "chunk_rows": 0, "ring_rows": 0}

    # ---- public API ------------------------------------------------------------------------

    def generate(self, prompts: Iterable, progress: bool = False) -> list[Result]:
        """Complete prompts (text, messages, token ids, or Request); results in input order."""
        return generate_in_order(self.run, prompts, progress)

    def prepare(self, req: Request) -> _Seq:
        """Validate and tokenize; raises InputError / PromptTooLongError (ValueErrors) naming
        the request and the problem."""
        c = self.config
        check_id(req.id, "request id")
        where = f"request {req.id!r}"
        prompt = check_prompt(req.prompt, where, self.model.config.vocab_size)
        check_sampling(max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                       top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop,
                       where=where)
        ids = encode_prompt(self.tokenizer, prompt, c.chat)
        if not ids:
            raise InputError(f"{where}: empty prompt after tokenization")
        max_new = req.max_new_tokens if req.max_new_tokens is not None else c.max_new_tokens
        if self.ring is not None and len(ids) > c.prefill_tokens:
            raise PromptTooLongError(
                f"request {req.id!r}: prompt has {len(ids)} tokens, more than prefill_tokens="
                f"{c.prefill_tokens}; an engine with context parallelism prefills each prompt "
                f"whole in one row (no chunked prefill): raise prefill_tokens")
        if len(ids) + max_new > self.max_seq_len:
            raise PromptTooLongError(
                f"request {req.id!r}: prompt has {len(ids)} tokens; with max_new_tokens={max_new} "
                f"it needs {len(ids) + max_new} positions but the limit is {self.max_seq_len}")
        pages = math.ceil((len(ids) + max_new) / c.page_size)
        if pages > c.num_pages - 1:
            raise PromptTooLongError(f"request {req.id!r}: needs {pages} cache pages, the pool "
                                     f"has {c.num_pages - 1}")
        pick = lambda v, d: d if v is None else v  # noqa: E731
        sampling = (pick(req.seed, c.seed), pick(req.temperature, c.temperature),
                    pick(req.top_p, c.top_p), pick(req.top_k, c.top_k))
        return _Seq(req, np.asarray(ids, np.int32), max_new, sampling,
                    t_submit=time.perf_counter())

    def run(self, requests: Iterable[Request], on_result: Callable[[Result], None],
            on_error: Callable[[Request, Exception], None] | None = None,
            progress: bool = False, total: int | None = None) -> None:
        """Complete every request, calling on_result as each finishes. Invalid requests go to
        on_error (default: raise)."""
        waiting: list[_Seq] = []
        for req in requests:
            try:
                waiting.append(self.prepare(req))
            except ValueError as e:
                if on_error is None:
                    raise
                on_error(req, e)
        bar = tqdm(total=total or len(waiting), desc="requests", disable=not progress)
        for _ in self.iterate(waiting, on_result, lambda: bar.update(1)):
            pass
        bar.close()

    def iterate(self, waiting: list[_Seq], on_result: Callable[[Result], None],
                on_done: Callable[[], None] | None = None) -> Iterator[None]:
        """The engine loop over prepared requests, as a generator that yields right after each
        device call is dispatched (before its result is read back). `run` just exhausts it; a
        data-parallel driver (data_parallel.py) advances one per device in turn, so every
        device computes while the host waits on another."""
        slots: list[_Seq | None] = [None] * self.config.max_batch
        try:
            while waiting or any(slots):
                self._admit(waiting, slots)
                active = [s for s in slots if s is not None]
                if not active:
                    raise RuntimeError("no request fits the page pool; raise num_pages")
                yield from self._prefill_steps([s for s in active if s.prefilled < len(s.ids)])
                yield from self._decode_steps(slots)
                for i, s in enumerate(slots):
                    if s is not None and s.finish is not None:
                        self.allocator.free(s.pages)
                        slots[i] = None
                        on_result(self._result(s))
                        if on_done is not None:
                            on_done()
        finally:  # interrupted (an exception, SIGTERM, the generator closed): free the pages
            for i, s in enumerate(slots):
                if s is not None:
                    self.allocator.free(s.pages)
                    slots[i] = None

    # ---- scheduling ------------------------------------------------------------------------

    def _admit(self, waiting: list[_Seq], slots: list) -> None:
        while waiting and None in slots:
            seq = waiting[0]
            need = math.ceil((len(seq.ids) + seq.max_new) / self.config.page_size)
            pages = self.allocator.allocate(need)
            if pages is None:
                return  # wait for running requests to free pages
            waiting.pop(0)
            seq.pages, seq.slot = pages, slots.index(None)
            slots[seq.slot] = seq

    def _prefill(self, pending: list[_Seq]) -> None:
        """One prefill step for these sequences, run to completion (tests, tools)."""
        for _ in self._prefill_steps(pending):
            pass

    def _prefill_steps(self, pending: list[_Seq]) -> Iterator[None]:
        """Generator: yields after each device call is dispatched (see `iterate`)."""
        c = self.config
        fresh = [s for s in pending if s.prefilled == 0 and len(s.ids) <= c.prefill_tokens]
        chunked = [s for s in pending if s not in fresh]
        if fresh:
            alone = c.sparse.min_length if c.sparse is not None else None
            rows = pack_rows([len(s.ids) for s in fresh], c.prefill_tokens, c.prefill_rows,
                             pack=c.packing, alone_from=alone)
            yield from self._run_packed([[fresh[i] for i in row] for row in rows])
        if chunked:
            yield from self._run_chunks(chunked[: c.prefill_rows])

    def _run_packed(self, rows: list[list[_Seq]]) -> Iterator[None]:
        c = self.config
        r, width, n = c.prefill_rows, c.prefill_tokens, c.max_batch
        tokens = np.zeros((r, width), np.int32)
        positions = np.zeros((r, width), np.int32)
        segments = np.zeros((r, width), np.int32)
        slots = np.full((r, width), c.num_pages * c.page_size, np.int32)  # out of range = skip
        last = np.zeros(n, np.int32)
        seqs = []
        for ri, row in enumerate(rows):
            col = 0
            for seg, s in enumerate(row, start=1):
                ln = len(s.ids)
                tokens[ri, col:col + ln] = s.ids
                positions[ri, col:col + ln] = np.arange(ln)
                segments[ri, col:col + ln] = seg
                slots[ri, col:col + ln] = page_slots(s.pages, c.page_size)[:ln]
                last[len(seqs)] = ri * width + col + ln - 1
                seqs.append(s)
                col += ln
        sampling, step = self._sampling(seqs, n)
        # One prompt per row (long prompts, prompts >= the sparse min_length): a causal prompt
        # forward without segment ids (dense attention runs its mask-free causal kernel, sparse
        # policies their whole-prompt layout). Caches without that step (MLA) stay packed.
        single = all(len(row) == 1 for row in rows) and hasattr(self.steps, "prefill_single")
        if single:
            lengths = np.ones(r, np.int32)  # unused rows: one (padding) token, as chunks do
            lengths[:len(rows)] = [len(row[0].ids) for row in rows]
            graphdef = self.graphdef if self.ring is None else self.ring_graphdef
            nxt, self.cache = self.steps.prefill_single(
                *self._model(graphdef), self.cache,
                *map(jnp.asarray, (tokens, lengths, slots, last)), sampling, step)
        else:
            nxt, self.cache = self.steps.prefill_packed(
                *self._model(self.graphdef), self.cache,
                *map(jnp.asarray, (tokens, positions, segments, slots, last)), sampling, step)
        yield
        self.stats["prefill_calls"] += 1
        self.stats["packed_rows"] += len(rows)
        self.stats["single_rows"] += len(rows) if single else 0
        self.stats["ring_rows"] += len(rows) if single and self.ring is not None else 0
        self._finish_prefill(seqs, np.asarray(nxt), [len(s.ids) for s in seqs])

    def _run_chunks(self, seqs: list[_Seq]) -> Iterator[None]:
        c = self.config
        r, width = c.prefill_rows, c.prefill_tokens
        tokens = np.zeros((r, width), np.int32)
        start = np.zeros(r, np.int32)
        n_valid = np.ones(r, np.int32)
        ends = []
        for i, s in enumerate(seqs):
            chunk = s.ids[s.prefilled: s.prefilled + width]
            tokens[i, :len(chunk)] = chunk
            start[i], n_valid[i] = s.prefilled, len(chunk)
            ends.append(s.prefilled + len(chunk))
        table = self._page_table(seqs, r, max(int(start.max()) + width, 1))
        sampling, step = self._sampling(seqs, r)
        nxt, self.cache = self.steps.prefill_chunk(*self._model(self.graphdef), self.cache,
                                              jnp.asarray(tokens), table, jnp.asarray(start),
                                              jnp.asarray(n_valid), sampling, step)
        yield
        self.stats["prefill_calls"] += 1
        self.stats["chunk_rows"] += len(seqs)
        self._finish_prefill(seqs, np.asarray(nxt), ends)

    def _finish_prefill(self, seqs: list[_Seq], nxt: np.ndarray, ends: list[int]) -> None:
        now = time.perf_counter()
        for i, (s, end) in enumerate(zip(seqs, ends)):
            s.prefilled = end
            if end == len(s.ids):  # prompt complete: its first generated token
                s.t_first = now
                self._append(s, int(nxt[i]))

    def _decode_steps(self, slots: list) -> Iterator[None]:
        live = [s for s in slots if s is not None and s.prefilled == len(s.ids) and s.finish is None
                and s.out]
        if not live:
            return
        c, b = self.config, self.config.max_batch
        tokens = np.zeros(b, np.int32)
        index = np.zeros(b, np.int32)
        rows: list[_Seq | None] = [None] * b
        for s in live:
            rows[s.slot] = s
            tokens[s.slot] = s.out[-1]
            index[s.slot] = len(s.ids) + len(s.out) - 1
        table = self._page_table(rows, b, int(index.max()) + 1)
        sampling, step = self._sampling(rows, b)
        nxt, self.cache = self.steps.decode(*self._model(self.graphdef), self.cache,
                                            jnp.asarray(tokens), table, jnp.asarray(index),
                                            sampling, step)
        yield
        self.stats["decode_calls"] += 1
        nxt = np.asarray(nxt)
        for s in live:
            self._append(s, int(nxt[s.slot]))

    # ---- helpers ---------------------------------------------------------------------------

    def _append(self, s: _Seq, tok: int) -> None:
        if tok in self.eos:
            s.finish = "eos"
            return
        s.out.append(tok)
        stop = s.req.stop
        if stop and self.tokenizer is not None and any(x in self.tokenizer.decode(s.out) for x in stop):
            s.finish = "stop"
        elif len(s.out) >= s.max_new:
            s.finish = "length"

    def _page_table(self, seqs: Sequence[_Seq | None], rows: int, length: int) -> jax.Array:
        """[rows, P] page ids covering `length` tokens, P rounded up to the bucket (bounded
        recompiles); unused entries point at the scratch page."""
        c = self.config
        n = -(-max(length, 1) // c.bucket) * c.bucket // c.page_size
        table = np.full((rows, n), SCRATCH_PAGE, np.int32)
        for i, s in enumerate(seqs):
            if s is not None:
                k = min(len(s.pages), n)
                table[i, :k] = s.pages[:k]
        return jnp.asarray(table)

    def _model(self, graphdef) -> tuple:
        """(graph, state) of the current weights as a step takes them (`jaxprefill.graph`)."""
        return self._flat.args(graphdef, self.state)

    def _sampling(self, seqs: Sequence[_Seq | None], n: int) -> tuple[Sampling, jax.Array]:
        """Per-row sampling settings and step numbers (tokens generated so far) for n rows."""
        # numpy arrays of the step's own dtypes: a dtype change in jnp.asarray would run a
        # device conversion per array before every step
        seed, top_k, step = (np.zeros(n, np.int32) for _ in range(3))
        temperature, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        for i, s in enumerate(seqs):
            if s is not None:
                seed[i], temperature[i], top_p[i], top_k[i] = s.sampling
                step[i] = len(s.out)
        return (Sampling(*map(jnp.asarray, (seed, temperature, top_p, top_k))),
                jnp.asarray(step))

    def _result(self, s: _Seq) -> Result:
        now = time.perf_counter()
        text = self.tokenizer.decode(s.out) if self.tokenizer is not None else ""
        if s.finish == "stop":
            cut = min((text.find(x) for x in s.req.stop if x in text), default=len(text))
            text = text[:cut]
        t_first = s.t_first or now
        n_after = max(len(s.out) - 1, 0)
        return Result(s.req.id, text, s.out, len(s.ids), s.finish or "length",
                      t_first - s.t_submit, n_after / max(now - t_first, 1e-9) if n_after else 0.0)


def page_slots(pages: Sequence[int], page_size: int) -> np.ndarray:
    """int32 [len(pages) * page_size]: the cache slot of each position of a sequence whose
    positions fill ``pages`` in order (position t -> pages[t // page_size] * page_size +
    t % page_size), built per page rather than per position."""
    first = np.asarray(pages, np.int32)[:, None] * page_size
    return (first + np.arange(page_size, dtype=np.int32)[None, :]).reshape(-1)


def engine_ring(model, config: EngineConfig,
                mesh: Mesh | ContextParallel | None) -> ContextParallel | None:
    """The ring an engine's single-prompt prefill steps run on (None: no ring). Raises
    ValueError (TypeError for a mesh of the wrong type), one line, for a mesh the engine cannot
    use."""
    if mesh is not None and not isinstance(mesh, (Mesh, ContextParallel)):
        raise TypeError(f"engine mesh: expected a jax.sharding.Mesh (jp.make_mesh) or a "
                        f"ContextParallel, got {type(mesh).__name__}")
    ring = mesh if isinstance(mesh, ContextParallel) else context_for(model, mesh)
    if ring is None or ring.n == 1:
        if mesh is not None:
            raise ValueError("engine mesh: the engine uses a mesh for ring prefill only, and this "
                             "one has 1 device on its sequence axis (several devices running "
                             "replicas: EngineConfig.data_parallel)")
        return None
    if getattr(model, "cache_class", KVCache) is not KVCache or config.tpla is not None:
        raise ValueError(f"engine mesh: ring prefill in the engine runs Llama-family models "
                         f"(paged per-head K/V), not {type(model).__name__}"
                         f"{' with tpla' if config.tpla is not None else ''}; "
                         f"jp.generate(mesh=) prefills DeepSeek models on the ring")
    if config.data_parallel > 1:
        raise ValueError("engine mesh: ring prefill with data_parallel > 1 is not supported "
                         "(each replica would need its own ring)")
    if config.sparse is not None:
        for rule in config.sparse.rules:
            if rule.policy.name == "dense":
                continue
            check_policy(rule.policy, tensor_split=ring.head_axis(
                model.config.num_heads, model.config.num_kv_heads) is not None)
            if ring.block % rule.policy.block_size:
                raise ValueError(f"engine mesh: the sparse policy's block_size "
                                 f"({rule.policy.block_size}, policy {rule.policy.name!r}) must "
                                 f"divide ContextParallel.block ({ring.block})")
    return ring


def generate_in_order(run: Callable, prompts: Iterable, progress: bool) -> list[Result]:
    """Drive an engine's `run(requests, on_result, progress=)` and return results in input order."""
    reqs = [p if isinstance(p, Request) else Request(id=str(i), prompt=p)
            for i, p in enumerate(check_prompt_list(prompts, allow_empty=True))]
    done: dict[str, Result] = {}
    run(reqs, lambda r: done.__setitem__(r.id, r), progress=progress)
    return [done[r.id] for r in reqs]
