"""The KV caches hotswap's attention writes and reads: per-row (static) or paged blocks with prefix caching.

**Static** (:class:`StaticCache`): one tensor of rows × max_seq_len positions per layer; every row owns its
positions whether it uses them or not. Models run beside the base (logit kinds') use it (their rows follow the
base's), and so does the engine with ``kv_block_size=0``.

**Paged** (:class:`PagedCache`, the engine's default): one pool of fixed-size blocks per layer; each row has a
block table (cache position p of the row lives at block ``table[p // block_size]``, offset ``p % block_size``), so
memory follows the tokens rows actually hold. Written for continuous batching as in vLLM's PagedAttention, read
here with a gather over the row's blocks then SDPA (plain torch on every device). Two extra blocks exist: the
*null* block (always zero, pads block tables) and the *scratch* block (padding tokens write there; never read),
so nothing a row reads was ever written by another row's padding.

**Prefix caching** (:class:`BlockPool`): a full block of a prompt is identified by a digest chained over the
serving key (the base, the exact adapter set with versions, weights and the rank asked for) and every token before and
in it; a later row whose prompt starts with blocks of the same digests shares them instead of recomputing them.
Different keys never share (two adapters, an adapter and the base, two versions: different digests). Unreferenced
cached blocks are kept in LRU order and reused last; dropping an adapter forgets its blocks.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence

import torch

from hotswap.errors import CapacityExceeded


class Batch(ABC):
    """What one forward attends over: token (b, t) sits at cache position ``positions[b, t]`` of row ``b``'s cache
    (-1: padding, which writes only scratch space and attends to position 0 of its row)."""

    def __init__(self, positions: torch.Tensor, key_len: int) -> None:
        self.positions = positions  # (B, T)
        self.key_len = key_len  # keys read per row: positions [0, key_len)
        self._masks: dict[int | None, torch.Tensor] = {}
        self._biases: dict[tuple, torch.Tensor] = {}

    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, T, key_len) bool: key position k is visible to a query at q iff k <= q (and q - k < window)."""
        if window not in self._masks:
            q = self.positions.clamp(min=0)[:, None, :, None]  # (B, 1, T, 1)
            k = torch.arange(self.key_len, device=q.device)  # (L,)
            visible = k <= q
            if window is not None:
                visible &= q - k < window
            self._masks[window] = visible
        return self._masks[window]

    def bias(self, window: int | None, dtype: torch.dtype, heads: tuple[int, int], kv_major: bool) -> torch.Tensor:
        """:meth:`mask` as an additive score bias (0 or -inf) for every layer's grouped scores, computed once per
        forward: (KV*B, G*T, key_len) in ``kv_major`` order, else (B*KV, G*T, key_len); ``heads`` = (KV, G)."""
        key = (window, dtype, heads, kv_major)
        if key not in self._biases:
            (kv, g), (b, t), length = heads, self.positions.shape, self.key_len
            bias = torch.zeros((b, 1, t, length), dtype=dtype, device=self.positions.device)
            bias.masked_fill_(~self.mask(window), float("-inf"))  # (B, 1, T, L)
            order = (kv, b, g, t, length) if kv_major else (b, kv, g, t, length)
            grouped = bias[None] if kv_major else bias[:, :, None]  # broadcastable to ``order``
            self._biases[key] = grouped.expand(order).reshape(kv * b, g * t, length)
        return self._biases[key]

    @abstractmethod
    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store key/value (B, KV, T, hd) of ``layer`` at the tokens' positions."""

    @abstractmethod
    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, KV, key_len, hd) of every row at positions [0, key_len)."""


# -- static -----------------------------------------------------------------------------------------------------
class StaticCache:
    """(layers, rows, kv_heads, max_seq_len + 1, head_dim) keys and values; the extra position is scratch."""

    def __init__(
        self, layers: int, rows: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        shape = (layers, rows, kv_heads, max_seq_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    def bind(self, rows: Sequence[int], positions: torch.Tensor, contiguous: bool = False) -> Batch:
        rows_t = torch.as_tensor(rows, device=positions.device)
        return _StaticBatch(self, rows_t, positions, contiguous, _key_len(positions))

    # The static decode (:mod:`hotswap.serve.model.graphs`): rows [0, n) read over a fixed key length, from tables
    # written into fixed buffers outside the step (here the rows themselves).
    def decode_table(self, n: int, key_len: int) -> torch.Tensor:
        return torch.arange(n)

    def bind_table(self, table: torch.Tensor, positions: torch.Tensor, key_len: int) -> Batch:
        """``table`` from :meth:`decode_table`, on the device; tensor ops only (capturable)."""
        return _StaticBatch(self, table, positions, True, key_len)

    # The row lifecycle the scheduler drives, as for the paged cache: a static row owns all its positions from
    # the start, so it reserves and extends without asking anyone, and shares nothing.
    def reserve(self, row: int, positions: int, digests: Sequence[bytes] = ()) -> int:
        return 0

    def extend(self, row: int, position: int) -> bool:
        return True

    def register(self, row: int, digests: Sequence[bytes], adapter_refs: Sequence[str]) -> None:
        """Nothing to share: prefix caching needs the paged cache."""

    def drop(self, ref: str) -> None:
        """Nothing cached per adapter."""

    @torch.inference_mode()  # a cache made inside the engine's loop holds inference tensors
    def release(self, row: int, end: int) -> None:
        """Zero positions [0, end) of ``row``: a finished row's keys/values never reach the next one (masked
        positions holding a faulted row's NaN would still poison it, softmax weight 0 times NaN being NaN)."""
        self.k[:, row, :, :end] = 0
        self.v[:, row, :, :end] = 0

    def write_kv(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put per-layer keys/values (an adapter's context) at positions [0, P) of ``row``."""
        for i, (k, v) in enumerate(kv):  # each (kv_heads, P, head_dim)
            self.k[i, row, :, : k.shape[1]] = k
            self.v[i, row, :, : v.shape[1]] = v


def _key_len(positions: torch.Tensor) -> int:
    """Keys a forward reads per row: up to its last position (padding alone still reads position 0)."""
    return max(int(positions.max()) + 1, 1)


class _StaticBatch(Batch):
    def __init__(
        self, cache: StaticCache, rows: torch.Tensor, positions: torch.Tensor, contiguous: bool, key_len: int
    ) -> None:
        super().__init__(positions, key_len)
        self.cache, self.contiguous = cache, contiguous  # contiguous: rows == arange(B), read without a gather
        self.rows = rows
        self.index = torch.where(positions >= 0, positions, cache.max_seq_len)  # (B, T) write index

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        c = self.cache
        c.k[layer][self.rows[:, None], :, self.index] = key.transpose(1, 2).to(c.k.dtype)  # (B, T, KV, hd)
        c.v[layer][self.rows[:, None], :, self.index] = value.transpose(1, 2).to(c.v.dtype)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, n = self.cache, self.rows.shape[0]
        if self.contiguous:
            return c.k[layer, :n, :, : self.key_len], c.v[layer, :n, :, : self.key_len]
        return c.k[layer, self.rows, :, : self.key_len], c.v[layer, self.rows, :, : self.key_len]


# -- paged --------------------------------------------------------------------------------------------------------
class BlockPool:
    """Block ids, their reference counts, and the prefix cache (digest -> block) with LRU reuse.

    A block is free (no data), in use (``refs`` > 0; maybe also cached), or cached and unreferenced (in ``lru``,
    reused only when no free block is left)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # digest -> block
        self.digest_of: dict[int, bytes] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody references, oldest first
        self.by_ref: dict[str, set[int]] = {}  # adapter ref -> cached blocks whose key names it

    def available(self) -> int:
        return len(self.free) + len(self.lru)

    def used(self) -> int:
        return self.num_blocks - len(self.free) - len(self.lru)

    def allocate(self) -> tuple[int, bool]:
        """A block for one more reference: (id, whether it held cached data that must not leak: zero it)."""
        if self.free:
            block, dirty = self.free.pop(), False
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            self._forget(block)
            dirty = True
        else:
            raise CapacityExceeded("the KV cache has no free block")
        self.refs[block] = 1
        return block, dirty

    def lookup(self, digests: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``digests``, each now referenced once more."""
        hits = []
        for digest in digests:
            block = self.cached.get(digest)
            if block is None:
                break
            hits.append(block)
        for block in hits:
            self.refs[block] += 1
            self.lru.pop(block, None)
        return hits

    def register(self, block: int, digest: bytes, adapter_refs: Sequence[str]) -> None:
        """Offer an in-use block as the cached copy of ``digest`` (kept private if another block already is)."""
        if digest in self.cached or block in self.digest_of:
            return
        self.cached[digest], self.digest_of[block] = block, digest
        for ref in adapter_refs:
            self.by_ref.setdefault(ref, set()).add(block)

    def release(self, blocks: Sequence[int]) -> list[int]:
        """Drop one reference from each block; returns the blocks that became free (to be zeroed)."""
        freed = []
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.digest_of:
                    self.lru[block] = None
                else:
                    self.free.append(block)
                    freed.append(block)
        return freed

    def drop(self, ref: str) -> list[int]:
        """Forget the cached blocks of adapter ``ref`` (unloaded or replaced); returns those now free."""
        freed = []
        for block in self.by_ref.pop(ref, set()):
            if block not in self.digest_of:
                continue  # already forgotten through another adapter of its key
            self._forget(block)
            if block in self.lru:
                del self.lru[block]
                self.free.append(block)
                freed.append(block)
        return freed

    def _forget(self, block: int) -> None:
        digest = self.digest_of.pop(block)
        del self.cached[digest]
        for blocks in self.by_ref.values():
            blocks.discard(block)


def block_digests(key: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """One digest per full block of ``tokens``: sha256 chained over ``key`` and every token up to the block's end."""
    out, prev = [], hashlib.sha256(key).digest()
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        prev = hashlib.sha256(prev + b"".join(t.to_bytes(8, "little", signed=True) for t in block)).digest()
        out.append(prev)
    return out


class PagedCache:
    """(layers, kv_heads, blocks + 2, block_size, head_dim) keys and values, a block table per row: kv heads
    outermost, so that one ``index_select`` gathers a forward's keys as (kv_heads, rows, positions, head_dim), which
    the attention's batched matmuls read in place (block-major storage needed a second, transposing copy per layer)."""

    def __init__(
        self,
        layers: int,
        rows: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
    ) -> None:
        shape = (layers, kv_heads, num_blocks + 2, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.null, self.scratch = num_blocks, num_blocks + 1
        self.pool = BlockPool(num_blocks)
        self.tables: list[list[int]] = [[] for _ in range(rows)]

    @staticmethod
    def block_bytes(layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block holds across layers, keys and values."""
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def bind(self, rows: Sequence[int], positions: torch.Tensor, contiguous: bool = False) -> Batch:
        width = self.blocks_for(_key_len(positions))
        return _PagedBatch(self, self._table(rows, width).to(positions.device), positions)

    def decode_table(self, n: int, key_len: int) -> torch.Tensor:
        """Block tables (n, key_len / block_size) of rows [0, n), for the static decode (see StaticCache's)."""
        return self._table(range(n), self.blocks_for(key_len))

    def bind_table(self, table: torch.Tensor, positions: torch.Tensor, key_len: int) -> Batch:
        return _PagedBatch(self, table, positions)

    def _table(self, rows: Sequence[int], width: int) -> torch.Tensor:
        """The rows' block tables over ``width`` blocks, padded with the null block (host tensor)."""
        table = torch.full((len(rows), width), self.null, dtype=torch.long)
        for b, row in enumerate(rows):
            blocks = self.tables[row][:width]
            table[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        return table

    # -- block tables (engine thread) ---------------------------------------------------------------------------
    def reserve(self, row: int, positions: int, digests: Sequence[bytes] = ()) -> int | None:
        """Give ``row`` blocks for cache positions [0, positions), sharing cached blocks of ``digests`` (the full
        blocks of the row's sequence under its key). Returns the positions already computed (shared), or None
        when the pool cannot hold the row now (nothing is taken then)."""
        assert not self.tables[row], "a row reserves once, when it is bound"
        needed = self.blocks_for(positions)
        # never share the block of the row's last position: its logits must be computed
        hits = self.pool.lookup(digests[: (positions - 1) // self.block_size])
        if needed - len(hits) > self.pool.available():
            self._zero(self.pool.release(hits))
            return None
        self.tables[row] = hits + [self._allocate() for _ in range(needed - len(hits))]
        return len(hits) * self.block_size

    def extend(self, row: int, position: int) -> bool:
        """Make sure ``row`` has a block for ``position``; False when the pool has none left."""
        table = self.tables[row]
        if position // self.block_size < len(table):
            return True
        if not self.pool.available():
            return False
        table.append(self._allocate())
        return True

    def register(self, row: int, digests: Sequence[bytes], adapter_refs: Sequence[str]) -> None:
        """Offer the row's full blocks of ``digests`` to the prefix cache."""
        for block, digest in zip(self.tables[row], digests, strict=False):
            self.pool.register(block, digest, adapter_refs)

    def release(self, row: int, end: int = 0) -> None:
        """Drop the row's blocks; the freed ones are zeroed (see :meth:`StaticCache.release`)."""
        self._zero(self.pool.release(self.tables[row]))
        self.tables[row] = []

    def drop(self, ref: str) -> None:
        self._zero(self.pool.drop(ref))

    def write_kv(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put per-layer keys/values (an adapter's context) at positions [0, P) of ``row`` (its first blocks)."""
        p = kv[0][0].shape[1]
        blocks, offsets = self._slots(row, torch.arange(p))
        for i, (k, v) in enumerate(kv):  # each (kv_heads, P, head_dim)
            self.k[i][:, blocks, offsets] = k.to(self.k.dtype)
            self.v[i][:, blocks, offsets] = v.to(self.v.dtype)

    def _slots(self, row: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.tensor(self.tables[row], dtype=torch.long, device=self.k.device)
        positions = positions.to(self.k.device)
        return table[positions // self.block_size], positions % self.block_size

    def _allocate(self) -> int:
        block, dirty = self.pool.allocate()
        if dirty:
            self._zero([block])
        return block

    @torch.inference_mode()
    def _zero(self, blocks: list[int]) -> None:
        if blocks:
            self.k[:, :, blocks] = 0
            self.v[:, :, blocks] = 0


class _PagedBatch(Batch):
    def __init__(self, cache: PagedCache, table: torch.Tensor, positions: torch.Tensor) -> None:
        """``table`` (B, width): the rows' blocks, on the device; tensor ops only."""
        bs = cache.block_size
        super().__init__(positions, table.shape[1] * bs)
        self.cache, self.table = cache, table
        pad = positions < 0
        safe = positions.clamp(min=0)
        block = torch.where(pad, cache.scratch, self.table.gather(1, safe // bs))  # (B, T)
        self.block, self.offset = block, torch.where(pad, 0, safe % bs)
        # the rows' blocks of every kv head, as rows of a layer's (KV * blocks, block_size * hd) view: (KV * B * width,)
        kv_heads, blocks = cache.k.shape[1:3]
        self.gather = (torch.arange(kv_heads, device=table.device)[:, None, None] * blocks + table).flatten()

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        c = self.cache
        c.k[layer][:, self.block, self.offset] = key.to(c.k.dtype).permute(1, 0, 2, 3)  # (KV, B, T, hd)
        c.v[layer][:, self.block, self.offset] = value.to(c.v.dtype).permute(1, 0, 2, 3)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv, blocks, bs, hd = self.cache.k.shape[1:]
        shape = (kv, self.table.shape[0], self.key_len, hd)  # (KV, B, L, hd)
        out = []
        for cache in (self.cache.k, self.cache.v):
            rows = cache[layer].view(kv * blocks, bs * hd).index_select(0, self.gather)  # the rows' blocks, copied
            out.append(rows.view(shape).transpose(0, 1))  # (B, KV, L, hd), kv-head major in memory
        return out[0], out[1]
