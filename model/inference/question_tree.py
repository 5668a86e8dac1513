"""The questions of a request as a token tree: leading tokens shared by several questions once,
and tokens an earlier request on the same image computed not at all.

The questions a request asks about one image start alike (``\\nWhat is region5 <bbox>?...``,
``\\nWhat colour is region5 <bbox>?...``, ``\\nHow is region5 <bbox> related to region1 ...``), so
as a tree (a trie of their tokens, per image) they hold far fewer positions than the rows do.  A
node is one token at one depth after its image's prefix; a ``<bbox>`` token is the same node only
for the same box (its embedding is that box's region feature).  Every node attends to its image's
prefix and to its ancestors, so computing the nodes once gives each row the keys and values its
own question would have (:meth:`model.inference.kv_decode.LlamaSteps.forward_tree`).

The keys and values of an image's nodes are kept with the image (:class:`QuestionNodes`, in the
engine's image cache), so the next request on that image (a new box: the same question texts up
to the new box's tokens, the relations' other boxes) computes only the nodes it adds.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["QuestionNodes", "QuestionTree", "question_tree"]


class QuestionNodes:
    """Keys and values of the question-tree nodes computed on one image: node path -> slot of
    ``kv`` ``(layers, 2, slots, H_kv, d)``, and the next-token logits ``(V,)`` of the nodes that
    ended a question (the same question again needs no forward).  Holds at most ``capacity``
    nodes; the least recently read go first (a node's values do not depend on which of its
    ancestors are stored, so any node may go)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slots: dict[Hashable, int] = {}
        self.read_at: dict[Hashable, int] = {}  # request count when last read or added
        self.logits: dict[Hashable, torch.Tensor] = {}
        self.kv: torch.Tensor | None = None
        self.requests = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        kv = 0 if self.kv is None else self.kv.numel() * self.kv.element_size()
        return kv + sum(t.numel() * t.element_size() for t in self.logits.values())

    def get(self, key: Hashable) -> int | None:
        slot = self.slots.get(key)
        if slot is not None:
            self.read_at[key] = self.requests
        return slot

    def add(self, keys: Sequence[Hashable], kv: torch.Tensor, logits: dict[Hashable, torch.Tensor]) -> None:
        """Keep ``kv`` ``(layers, 2, n, H_kv, d)`` of the nodes ``keys`` and the ``logits`` of the
        nodes that end questions (stored or among ``keys``); ends the request's reads."""
        n = min(len(keys), self.capacity)  # beyond: the first nodes, a tree's most shared ones
        if n:
            if len(self.slots) + n > self.capacity:
                self._evict(len(self.slots) + n - self.capacity)
            self._add_kv(keys[:n], kv[:, :, :n])
        self.logits.update((k, t) for k, t in logits.items() if k in self.slots)
        self.requests += 1

    def _evict(self, count: int) -> None:
        """Drop the ``count`` least recently read nodes; the rest move to the front slots."""
        keep = sorted(self.slots, key=self.read_at.__getitem__)[count:]
        if keep and self.kv is not None:
            self.kv[:, :, : len(keep)] = self.kv[:, :, [self.slots[k] for k in keep]]
        self.slots = {k: i for i, k in enumerate(keep)}
        self.read_at = {k: self.read_at[k] for k in keep}
        self.logits = {k: t for k, t in self.logits.items() if k in self.slots}

    def _add_kv(self, keys: Sequence[Hashable], kv: torch.Tensor) -> None:
        n = len(keys)
        used = len(self.slots)
        if self.kv is None or self.kv.shape[2] < used + n:
            size = min(self.capacity, max(used + n, 2 * (0 if self.kv is None else self.kv.shape[2])))
            grown = kv.new_empty(kv.shape[0], 2, size, *kv.shape[3:])
            if used:
                grown[:, :, :used].copy_(self.kv[:, :, :used])  # type: ignore[index]
            self.kv = grown
        self.kv[:, :, used : used + n].copy_(kv)
        self.slots.update(zip(keys, range(used, used + n)))
        self.read_at.update((k, self.requests) for k in keys)


@dataclass
class QuestionTree:
    """``C`` known nodes (keys and values stored, :class:`QuestionNodes`) and ``N`` nodes to
    compute, of R rows' questions laid out as :func:`model.inference.decode.question_batch` lays
    the rows out (right-aligned in ``Lq`` slots after a padding gap).

    * ``context``: per known node ``(group, slot)``;
    * ``keys``: path key of each node to compute (None: stored already);
    * ``source``: ``(N,)`` flat index ``row * Lq + slot`` of one occurrence of each node to
      compute in the row layout (where its embedding is);
    * ``depth``: ``(N,)`` 0-based depth (position ``P + depth``);
    * ``group``: per node to compute, its rows' prefix (image);
    * ``ancestors``: ``(N, C + N)`` bool, True where the column (known nodes first) is the
      node's ancestor or itself;
    * ``slots``: ``(R * Lq,)`` node (of the ``C + N``) of each slot of the row layout (a gap
      slot: its row's first node, finite values the key mask hides);
    * ``leaves``: ``(U,)`` the distinct computed last nodes of rows (their hidden states give
      the logits); ``leaf``: ``(R,)`` index into ``leaves`` of each row's last node, -1 for the
      rows in ``stored``: ``(row, logits (V,))`` whose last node is known with its logits;
    * ``finals``: per leaf, ``(a row ending there, its path key)`` (to store its logits).
    """

    context: list[tuple[int, int]]
    keys: list[Hashable | None]
    source: torch.Tensor
    depth: torch.Tensor
    group: list[int]
    ancestors: torch.Tensor
    slots: torch.Tensor
    leaves: torch.Tensor
    leaf: torch.Tensor
    stored: list[tuple[int, torch.Tensor]]
    finals: list[tuple[int, Hashable]]

    @property
    def size(self) -> int:
        """Number of nodes to compute."""
        return len(self.group)


def question_tree(
    keys: Sequence[Sequence[Hashable]],
    row_prefix: Sequence[int],
    device: torch.device,
    known: Sequence[QuestionNodes | None] | None = None,
) -> QuestionTree:
    """The tree of rows whose question positions have the identities ``keys[r]`` (equal keys at
    equal depths after the same ancestors are one node: token id, and for a ``<bbox>`` its
    region token), row r continuing prefix ``row_prefix[r]``; ``known[g]``: nodes stored for
    prefix g (a row whose last node is stored without its logits computes that node again)."""
    width = max(len(k) for k in keys)
    index: dict[Hashable, int] = {}  # (prefix, path key) -> node (known: -1 - context index)
    context: list[tuple[int, int]] = []
    new_keys: list[Hashable | None] = []
    source: list[int] = []
    depth: list[int] = []
    group: list[int] = []
    lineage: dict[int, list[int]] = {}  # node -> its ancestors and itself
    paths: list[list[int]] = []
    stored_logits: list[tuple[int, torch.Tensor]] = []
    finals: dict[int, tuple[int, Hashable]] = {}  # computed last node -> (a row, path key)
    for r, (row, g) in enumerate(zip(keys, row_prefix)):
        store = known[g] if known is not None else None
        gap = width - len(row)
        parent: Hashable = "prefix"  # a stored node's key does not name the request's image
        path: list[int] = []
        for j, key in enumerate(row):
            node_key = (parent, key)
            final = j == len(row) - 1
            logits = store.logits.get(node_key) if final and store is not None else None
            node = index.get((g, node_key))
            slot = store.get(node_key) if node is None and store is not None else None
            if slot is not None and (not final or logits is not None):
                node = index[g, node_key] = -1 - len(context)
                context.append((g, slot))
                lineage[node] = (lineage[path[-1]] if path else []) + [node]
            if final and node is not None and node < 0:
                if logits is not None:
                    stored_logits.append((r, logits))
                else:  # a known node ends the row: computed again for its logits
                    node = index.get((g, node_key, "final"))
            if node is None:
                node = len(source)
                index[(g, node_key, "final") if (g, node_key) in index else (g, node_key)] = node
                new_keys.append(None if slot is not None or (g, node_key, "final") in index else node_key)
                source.append(r * width + gap + j)
                depth.append(j)
                group.append(g)
                lineage[node] = (lineage[path[-1]] if path else []) + [node]
            if final and node >= 0:
                finals.setdefault(node, (r, node_key))
            path.append(node)
            parent = node_key
        paths.append(path)
    c, n = len(context), len(source)

    def column(node: int) -> int:
        return -1 - node if node < 0 else c + node

    ancestors = torch.zeros(n, c + n, dtype=torch.bool)
    rows = [node for node in range(n) for _ in lineage[node]]
    cols = [column(a) for node in range(n) for a in lineage[node]]
    ancestors[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = True
    slots = [column(node) for path in paths for node in [path[0]] * (width - len(path)) + path]
    leaves = sorted(finals)
    where = {node: i for i, node in enumerate(leaves)}
    return QuestionTree(
        context=context,
        keys=new_keys,
        source=torch.tensor(source, dtype=torch.long, device=device),
        depth=torch.tensor(depth, dtype=torch.long, device=device),
        group=group,
        ancestors=ancestors.to(device),
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        leaves=torch.tensor(leaves, dtype=torch.long, device=device),
        leaf=torch.tensor([where.get(path[-1], -1) for path in paths], dtype=torch.long, device=device),
        stored=stored_logits,
        finals=[finals[node] for node in leaves],
    )
