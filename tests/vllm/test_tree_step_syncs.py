"""Host <-> device synchronisations per serving step of vLLM's tree proposer (issue 23): counted
on the CPU and pinned.

Method. ``bench/tree_step.py`` runs the plugin's own step code (``TreeBatch.begin_step``, the
attention metadata builder's ``build``, ``TreeBatch.verify`` with the interpreted verification
and compaction kernels, the proposer's ``propose``) on a stand-in runner, as vLLM calls it.
On the CPU every tensor is a host tensor, so :class:`SyncCounter` (a ``TorchFunctionMode``)
follows the tensors that live on the device in a GPU run: it marks the tensors vLLM keeps on
the device (the stand-in runner's ``positions``, ``input_ids``, block table, K/V planes, the
metadata's ``query_start_loc``/``seq_lens``, the logits), every tensor a torch call makes from a
marked one or written in place from one, and every tensor the step's device-side code
(verification, compaction, attention planning, the plugin's tree step: :data:`DEVICE_SIDE`)
copies ``.to(device)`` (a host-to-device copy: not a sync, a fresh marked tensor) or makes with
an explicit ``device=``. A synchronisation is a read of a marked tensor on the host: ``item``, ``tolist``,
``cpu``, ``numpy``, ``__array__``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``, and the
operations whose output size depends on a device value (``nonzero``, ``unique``,
``masked_select``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``). Only
reads made by tkernels' code are counted (the nearest frame outside torch is in ``tkernels/``
or the plugins), not the harness's stand-ins for vLLM (vLLM's own read of the sampled tokens)
and not Triton's interpreter (a kernel launch on the GPU). What this cannot see: syncs inside
a torch op that the op's name does not tell (none known on this path), and CUDA-specific
behaviour such as pageable-memory copies.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
OURS = (str(ROOT / "tkernels") + "/", str(ROOT / "plugins") + "/")
TORCH_DIR = str(Path(torch.__file__).parent) + "/"
MARK = "_tkernels_on_device"
# The step's device-side code: what it copies .to(device) or makes with an explicit device= lives
# on the device. (The drafters' host code, spec/token_recycling.py, spec/drafters.py,
# spec/drafting/ and spec/tree.py, passes devices to follow its inputs, which live on the host.)
DEVICE_SIDE = tuple(str(ROOT / p) for p in ("plugins/vllm/tree.py", "plugins/vllm/attention.py", "tkernels/attention/",
                                              "tkernels/spec/verify/", "tkernels/spec/kv_compaction.py"))

_T = torch.Tensor
READS = {_T.item, _T.tolist, _T.cpu, _T.numpy, _T.__array__, _T.__bool__, _T.__int__, _T.__float__, _T.__index__}
VALUE_SIZED = {torch.nonzero, _T.nonzero, torch.unique, _T.unique, torch.masked_select, _T.masked_select}
INDEXING = {_T.__getitem__, _T.__setitem__, _T.index_put_, _T.index_put}
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn, torch.tensor,
             torch.as_tensor}


def on_device(t: torch.Tensor) -> torch.Tensor:
    setattr(t, MARK, True)
    return t


def _marked(x) -> bool:
    return isinstance(x, torch.Tensor) and getattr(x, MARK, False)


class SyncCounter(TorchFunctionMode):
    """Counts the host reads of device tensors made by tkernels' code (module doc)."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter[str] = Counter()

    @staticmethod
    def _caller() -> str:
        """The file of the nearest frame outside torch and this file."""
        for f in reversed(traceback.extract_stack()[:-2]):
            if not (f.filename.startswith(TORCH_DIR) or f.filename == __file__):
                return f.filename
        return ""

    def _origin(self) -> str | None:
        """``file:line (function)`` of tkernels' frame making the call, or None (not ours, or
        inside Triton's interpreter)."""
        frames = traceback.extract_stack()[:-2]
        if any("/triton/" in f.filename for f in frames):
            return None
        for f in reversed(frames):
            if f.filename.startswith(TORCH_DIR) or f.filename == __file__:
                continue
            if f.filename.startswith(OURS):
                return f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} ({f.name})"
            return None
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        marked = any(_marked(x) for x in flat)
        sync = None
        if func in READS and marked:
            sync = getattr(func, "__name__", str(func))
        elif func in VALUE_SIZED and marked:
            sync = func.__name__
        elif func is torch.repeat_interleave and marked and kwargs.get("output_size") is None and len(args) > 1:
            sync = "repeat_interleave without output_size"
        elif func in INDEXING and any(_marked(x) and x.dtype == torch.bool for x in flat[1:]):
            sync = "boolean-mask indexing"
        if sync is not None:
            origin = self._origin()
            if origin is not None:
                self.syncs[f"{origin}: {sync}"] += 1
        out = func(*args, **kwargs)
        if func in (_T.cpu, _T.to) and marked and isinstance(out, torch.Tensor) and out is args[0] and func is _T.cpu:
            return out.clone()  # the host copy (on the CPU .cpu() returns the tensor itself)
        if ((func is _T.to and not marked and any(isinstance(x, (torch.device, str)) for x in flat[1:]))
                or ("device" in kwargs and func in (_T.to, *FACTORIES))) and self._caller().startswith(DEVICE_SIDE):
            if isinstance(out, torch.Tensor):
                if out is args[0] if args else False:
                    out = out.clone()  # a copy to the device is a new tensor
                return on_device(out)
        if marked and func not in READS:
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    setattr(x, MARK, True)
            name = getattr(func, "__name__", "")
            if (name.endswith("_") or name == "__setitem__") and args and isinstance(args[0], torch.Tensor):
                setattr(args[0], MARK, True)  # written in place from a device tensor: on the device
        return out


class MarkedStep:
    """bench/tree_step.py's step with vLLM's device tensors marked."""

    def __init__(self, step):
        self.step = step
        for plane in step.tree_batch._kv_planes:
            on_device(plane)
        on_device(step.block_table)

    def schedule(self):
        s = self.step
        s.schedule()
        on_device(s.runner.positions)
        on_device(s.runner.input_ids.gpu)
        on_device(s.metadata.query_start_loc)
        on_device(s.metadata.seq_lens)
        if s.spec is not None:
            on_device(s.spec.logits_indices)


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels (interpreted), as on a GPU: not the CPU references."""
    for name in ("TKERNELS_VLLM_CPU_ATTENTION", "TKERNELS_VLLM_CPU_TEST_BACKEND"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pinned_copies(monkeypatch):
    """``tree.host_copy`` as on a GPU: a ``non_blocking`` copy into a pinned host buffer, enqueued
    before vLLM's own read of the step's sampled tokens on the same stream, so complete when the
    proposer reads it (no synchronisation of its own); here a fresh host tensor."""
    from tkernels.plugins.vllm import tree

    def host_copy(tensor, buffers, name):
        out = tensor.clone()
        setattr(out, MARK, False)  # on the host (the counter marks what a torch call makes from a device tensor)
        return out

    monkeypatch.setattr(tree, "host_copy", host_copy)


@pytest.fixture
def device_capture(monkeypatch):
    """The proposer's top-k capture as on a GPU: ``host_topk.top_k_probs`` compiles only for
    logits on the host (here every tensor is); a GPU's logits take its reference, torch's top-k
    and log-sum-exp on the device, which read nothing back."""
    from tkernels.spec import host_topk
    from tkernels.spec.token_recycling import top_k_probs

    monkeypatch.setattr(host_topk, "top_k_probs", top_k_probs)


def test_a_tree_step_syncs_once_in_verification(kernels, pinned_copies, device_capture):
    from tree_step import TreeServingStep

    vocab, batch, nodes = 64, 4, 9
    rng = np.random.default_rng(0)
    histories = [list(rng.integers(0, 8, 40)) for _ in range(batch)]  # repetitive: drafts from both sources
    step = TreeServingStep(histories, vocab, nodes, "hybrid", max_model_len=256)
    marked = MarkedStep(step)
    for _ in range(3):  # warm-up: every row drafts trees, kernels are compiled
        marked.schedule()
        step.begin()
        step.plan()
        out = step.verify(on_device(step.logits()))
        step.propose(step.commit(out))
    assert any(size > 1 for size in step.last_tree_sizes)
    per_step = []
    for _ in range(2):
        counter = SyncCounter()
        marked.schedule()
        logits = on_device(step.logits())
        with counter:
            step.begin()
            plan = step.plan()
            out = step.verify(logits)
        sampled = step.commit(out)  # vLLM's own read of the sampled tokens (every method pays it)
        with counter:
            step.propose(sampled)
        assert step.tree_batch.step.is_tree.any() and plan.plans[None].has_tree
        per_step.append(counter.syncs)
    report = "\n".join(f"{n} x {where}" for where, n in sorted(per_step[-1].items()))
    # The sync left in a step: tkernels/spec/verify/inputs.py (_check_tree_batch), whether some
    # node's logits are unusable (NaN, +inf, no finite logit), the flag that lets one request
    # fail alone instead of returning a token outside the vocabulary (docs/design.md, tree
    # verification). Planning (vLLM's host copies and the step's host trees), the trees (built
    # and checked on the host once, moved to the device once) and KV compaction (checked=True)
    # read nothing; what the proposer learns from (the captured top-k, verification's accepted
    # nodes) reaches the host by pinned non-blocking copies (pinned_copies).
    assert sum(per_step[-1].values()) == 1, report
    assert len(per_step[-1]) == 1 and per_step[0] == per_step[-1], report


def test_the_counter_sees_a_device_read_and_ignores_host_tensors():
    """The method's own check: a read of a marked tensor by tkernels' code is counted, a read
    of a host tensor is not."""
    from tkernels.spec.kv_compaction import compact_kv_reference

    cache = on_device(torch.zeros(1, 4, 4, 1, 8))
    table = on_device(torch.arange(4, dtype=torch.int32).view(1, 4))
    args = [on_device(t) for t in (torch.tensor([3], dtype=torch.int32), torch.tensor([[0, 2]], dtype=torch.int32),
                                   torch.tensor([2], dtype=torch.int32))]
    with SyncCounter() as counter:
        compact_kv_reference([cache], table, *args, checked=True)
    checked = sum(counter.syncs.values())
    with SyncCounter() as counter:
        compact_kv_reference([cache], table, *args)
    assert sum(counter.syncs.values()) == checked + 1  # the public call's one read of its value checks
    from tkernels.spec import validate_parents

    parents, cu_nodes = torch.tensor([-1, 0, 0, 1], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32)
    with SyncCounter() as counter:
        validate_parents(parents, cu_nodes)
    assert not counter.syncs  # host tensors: nothing to synchronise
    with SyncCounter() as counter:
        validate_parents(on_device(parents.clone()), cu_nodes)
    assert sum(counter.syncs.values()) >= 1  # the same check on a device copy reads it back
