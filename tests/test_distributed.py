"""Class-sharded margin cross-entropy (marginkern.distributed) on 2 and 3 CPU processes over gloo, against the
single-process marginkern.margin_cross_entropy with the concatenated weight: loss, dL/dinput (identical on
every rank) and each rank's slice of dL/dweight; uneven shards, ranks without targets, ignored rows,
reductions, the modules, the gather helper and argument errors.

One pool of worker processes per world size serves every test (spawning costs seconds, a task milliseconds):
a test sends a module-level task function to every rank and gets one result per rank back.
"""
import contextlib
import copy
import datetime
import functools
import os
import queue
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp

import marginkern as mk
from marginkern import distributed as mkd
from marginkern import reference
from tests.helpers import REL_TOL, assert_close_rel

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

TASK_TIMEOUT_S = 120


# ---- the worker pool ---------------------------------------------------------------------------------------

def _worker(rank, world_size, init_file, tasks, results):
    torch.set_num_threads(1)  # W processes share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TASK_TIMEOUT_S))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:  # noqa: BLE001 — reported to the test, which fails with the traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class World:
    """W worker processes in one gloo process group; `run(fn, *args)` calls fn(rank, W, *args) on every rank."""

    def __init__(self, size, init_file):
        ctx = mp.get_context("spawn")
        self.size = size
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.results = ctx.Queue()
        self.processes = [ctx.Process(target=_worker, args=(r, size, str(init_file), self.tasks[r], self.results),
                                      daemon=True) for r in range(size)]
        for p in self.processes:
            p.start()

    def run(self, fn, *args):
        for q in self.tasks:
            q.put((fn, args))
        values, failures = [None] * self.size, []
        for _ in range(self.size):
            try:
                rank, ok, value = self.results.get(timeout=TASK_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"{fn.__name__}: no answer from the workers in {TASK_TIMEOUT_S} s (a hang?)")
            if ok:
                values[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            pytest.fail(f"{fn.__name__} failed\n" + "\n".join(failures))
        return values

    def close(self):
        for q in self.tasks:
            q.put(None)
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W{w}")
def world(request, tmp_path_factory):
    w = World(request.param, tmp_path_factory.mktemp("gloo") / "init")
    yield w
    w.close()


# ---- tasks (run on every rank) -----------------------------------------------------------------------------

def _sharded_loss_and_grads(rank, world_size, x, w, t, kwargs, backend=None, autocast=False):
    """(loss, dL/dinput, dL/dweight_shard) of this rank, for a gradient of 1 on every loss entry."""
    if backend is not None:
        os.environ["MARGINKERN_BACKEND"] = backend
    try:
        K = kwargs.get("subcenters", 1)  # rows of w per class
        start, stop = mkd.shard_range(w.shape[0] // K, rank, world_size)
        x = x.clone().requires_grad_()
        shard = w[start * K:stop * K].clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = mkd.sharded_margin_cross_entropy(x, shard, t, class_start=start, num_classes=w.shape[0] // K,
                                                    **kwargs)
        gx, gw = torch.autograd.grad(loss.sum(), (x, shard))
        return loss.detach(), gx, gw
    finally:
        os.environ.pop("MARGINKERN_BACKEND", None)


def _module_shards(rank, world_size, D, C, x, t):
    torch.manual_seed(0)  # every rank alike, as training scripts do: the shards must still differ
    module = mkd.ShardedArcFaceLoss(D, C, margin=0.4)
    assert (module.class_start, module.class_start + module.weight.shape[0]) == mkd.shard_range(C, rank, world_size)
    loss = module(x, t)
    loss.backward()
    cosface = mkd.ShardedCosFaceLoss(D, C, dtype=torch.float64)
    assert cosface.options["m3"] == 0.35 and cosface.weight.dtype == torch.float64
    assert f"classes=[{module.class_start}, " in repr(module)
    # A-Softmax's λ schedule: a step per step of an optimizer holding the shard, as the single-process modules
    sphere = mkd.ShardedCombinedMarginLoss(D, C, 4.0, 0.0, 0.0, scale=30.0, lambda_min=0.0, lambda_base=10.0,
                                           lambda_gamma=1.0)
    optimizer = torch.optim.SGD(sphere.parameters(), lr=0.0)
    sphere(x, t).backward()
    optimizer.step()
    second = sphere(x, t)
    want = mkd.sharded_margin_cross_entropy(x, sphere.weight, t, class_start=sphere.class_start, num_classes=C,
                                            scale=30.0, m1=4.0, m2=0.0, lambda_=5.0)
    assert sphere.lambda_step == 1 and torch.equal(second, want), (sphere.lambda_step, second, want)
    second.backward()
    optimizer.step()
    assert sphere.lambda_step == 2
    return module.weight.detach().clone(), loss.detach(), module.weight.grad


def _gathered_training_step(rank, world_size, x_all, w, t_all):
    """Each rank holds its own rows; gather_embeddings, the sharded loss, backward: this rank's input grad."""
    b = x_all.shape[0] // world_size
    local_x = x_all[rank * b:(rank + 1) * b].clone().requires_grad_()
    local_t = t_all[rank * b:(rank + 1) * b]
    x, t = mkd.gather_embeddings(local_x), mkd.gather_embeddings(local_t)
    assert torch.equal(t, t_all)
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    loss = mkd.sharded_margin_cross_entropy(x, w[start:stop], t, class_start=start, num_classes=w.shape[0])
    loss.backward()
    return local_x.grad


def _sampled_module_step(rank, world_size, D, C, x, t, rate, ignore_index, subcenters=1):
    """The module with class sampling: its loss and weight gradient, and the draw it made (replayed)."""
    torch.manual_seed(10 + rank)  # ranks draw different negatives
    module = mkd.ShardedCombinedMarginLoss(D, C, 1.0, 0.3, 0.1, sample_rate=rate, label_smoothing=0.1,
                                           ignore_index=ignore_index, subcenters=subcenters, dtype=torch.float64)
    state = torch.get_rng_state()
    loss = module(x, t)
    loss.backward()
    torch.set_rng_state(state)
    sampled, step_target, shard, index = mkd._sampled_shards(module.weight.detach(), t, module.class_start, rate,
                                                             ignore_index, None, subcenters)
    module.eval()
    full_loss = module(x, t).detach()  # eval mode: every class
    return (loss.detach(), module.weight.grad, sampled, step_target, shard.start, index, module.class_start,
            module.weight.detach(), full_loss)


def _draw_with_one_seed(rank, world_size, C):
    """The local positions each rank samples when every rank was seeded alike."""
    torch.manual_seed(0)
    module = mkd.ShardedArcFaceLoss(4, C, sample_rate=0.25)
    return [mkd._sampled_shards(module.weight.detach(), torch.tensor([-100]), module.class_start, 0.25, -100,
                                None)[3] for _ in range(3)]


def _double_backward(rank, world_size, x, w, t):
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    x, shard = x.clone().requires_grad_(), w[start:stop].clone().requires_grad_()
    loss = mkd.sharded_margin_cross_entropy(x, shard, t, class_start=start, num_classes=w.shape[0])
    try:
        torch.autograd.grad(loss, x, create_graph=True)
    except RuntimeError as e:
        return str(e)
    return "no error"


def _single_member_group(rank, world_size, x, w, t):
    group = dist.new_group([0])  # every rank must take part in creating it
    if rank != 0:
        with pytest.raises(ValueError, match="group: this process is not a member"):
            mkd.sharded_margin_cross_entropy(x, w, t, class_start=0, num_classes=w.shape[0], group=group)
        return None
    x = x.clone().requires_grad_()
    loss = mkd.sharded_margin_cross_entropy(x, w, t, class_start=0, num_classes=w.shape[0], group=group)
    loss.backward()
    # modules over the group deep-copy (a model's EMA or reference copy), sharing the group, not the parameters
    head = mkd.ShardedArcFaceLoss(x.shape[1], w.shape[0], group=group)
    twin = copy.deepcopy(head)
    assert twin.group is group and twin.weight is not head.weight and torch.equal(twin.weight, head.weight)
    torch.testing.assert_close(twin(x.detach(), t), head(x.detach(), t))
    for module in (mk.InfoNCELoss(learnable_scale=True, group=group), mk.SigLIPLoss(group=group),
                   mk.SupConLoss(group=group)):
        twin = copy.deepcopy(module)
        assert twin.group is group and all(a is not b and torch.equal(a, b)
                                           for a, b in zip(twin.parameters(), module.parameters()))
    return loss.detach(), x.grad


def _argument_errors(rank, world_size):
    C, D = 10, 4
    torch.manual_seed(0)  # every rank passes the same (all-gathered) rows, as the contract says
    x, w, t = torch.randn(5, D), torch.randn(C, D), torch.randint(0, C, (5,))
    start, stop = mkd.shard_range(C, rank, world_size)
    shard = w[start:stop]

    def call(weight_shard=shard, target=t, **kw):
        kw = dict(dict(class_start=start, num_classes=C), **kw)
        return mkd.sharded_margin_cross_entropy(x, weight_shard, target, **kw)

    with pytest.raises(ValueError, match=r"weight_shard must hold classes \[\d+, \d+\) on rank"):
        call(weight_shard=w)
    with pytest.raises(ValueError, match="class_start must be"):
        call(class_start=start + 1)
    with pytest.raises(TypeError, match="class_start must be an int, got float"):
        call(class_start=float(start))
    with pytest.raises(TypeError, match="num_classes must be an int, got NoneType"):
        call(num_classes=None)
    assert torch.equal(call(class_start=torch.tensor(start), num_classes=torch.tensor(C)), call())
    with pytest.raises(ValueError, match="num_classes must be ≥ the process group's size"):
        call(weight_shard=w[:1], class_start=rank, num_classes=world_size - 1)
    with pytest.raises(ValueError, match=r"target holds class 10, outside \[0, 10\)"):
        call(target=torch.full((5,), C))
    with pytest.raises(TypeError, match=r"weight_shard must have the dtype of input"):
        call(weight_shard=shard.double())
    with pytest.raises(ValueError, match=r"weight_shard must have shape \(C, D=4\)"):
        call(weight_shard=shard[:, :3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(reduction="avg")
    with pytest.raises(ValueError, match="m2 must lie in"):
        call(m2=-0.1)
    with pytest.raises(ValueError, match="num_classes must be ≥ the process group's size"):
        mkd.ShardedArcFaceLoss(D, world_size - 1)
    with pytest.raises(ValueError, match=r"local must be a tensor of rows \(b, ...\), got shape \(\)"):
        mkd.gather_embeddings(torch.tensor(1.0))
    # a valid target held by another rank is fine, and the group still works after the errors above
    return float(call(target=torch.full((5,), C - 1)))


def _sharded_row_margin_grads(rank, world_size, x, w, t, m2, m3, kwargs, differ=False):
    """(loss, dL/dinput, dL/dweight_shard, dL/dm2, dL/dm3) of this rank with per-row margins (differ: rank 1 passes
    other margins)."""
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    x, shard = x.clone().requires_grad_(), w[start:stop].clone().requires_grad_()
    m2, m3 = (m.clone().requires_grad_() for m in (m2 + (0.01 if differ and rank == 1 else 0.0), m3))
    loss = mkd.sharded_margin_cross_entropy(x, shard, t, class_start=start, num_classes=w.shape[0], m2=m2, m3=m3,
                                            **kwargs)
    return (loss.detach(),) + torch.autograd.grad(loss, (x, shard, m2, m3))


# kind: (sharded module, single-process module, their options, their statistics' buffers)
STEP_MODULES = {
    "adaface": ("ShardedAdaFaceLoss", "AdaFaceLoss", dict(t_alpha=0.3), ("batch_mean", "batch_std")),
    "magface": ("ShardedMagFaceLoss", "MagFaceLoss", dict(lower_norm=1.0, upper_norm=20.0, lambda_g=2.0), ()),
    "curricular": ("ShardedCurricularFaceLoss", "CurricularFaceLoss", dict(momentum=0.3), ("t",)),
    "mv": ("ShardedMVSoftmaxLoss", "MVSoftmaxLoss", dict(margin_type="arc"), ()),
    "interclass-filtering": ("ShardedArcFaceLoss", "ArcFaceLoss", dict(interclass_filtering_threshold=0.2), ()),
    # each rank draws with its own seed (10 + rank) and takes rank 0's draws: the single-process module draws with 10
    "elastic-arc": ("ShardedElasticArcFaceLoss", "ElasticArcFaceLoss", dict(std=0.1), ()),
    "elastic-cos": ("ShardedElasticCosFaceLoss", "ElasticCosFaceLoss", dict(std=0.1), ()),
}


def _adaptive_module_steps(rank, world_size, kind, D, C, x, t, weight, sample_rate=1.0):
    """Two training steps of the sharded module of `kind` (STEP_MODULES) holding this rank's slice of `weight`:
    (losses, dL/dx of each, dL/dweight_shard of each, its statistics' buffers after them)."""
    name, _, kwargs, buffers = STEP_MODULES[kind]
    module = getattr(mkd, name)(D, C, scale=16.0, dtype=torch.float64, sample_rate=sample_rate, **kwargs)
    start, stop = mkd.shard_range(C, rank, world_size)
    with torch.no_grad():
        module.weight.copy_(weight[start:stop])
    torch.manual_seed(10 + rank)  # sampled negatives differ per rank
    losses, grads_x, grads_w = [], [], []
    for step in range(2):
        xs = (x * (1 + step)).clone().requires_grad_()
        loss = module(xs, t)
        grads = torch.autograd.grad(loss, (xs, module.weight))
        losses.append(loss.detach())
        grads_x.append(grads[0])
        grads_w.append(grads[1])
    return losses, grads_x, grads_w, tuple(getattr(module, b).clone() for b in buffers)


def _sharded_log_probs_and_grads(rank, world_size, x, w, t, kwargs, upstream):
    """(log p_t, H, dL/dinput, dL/dweight_shard) of this rank for the loss Σ upstream[0]·log p_t + upstream[1]·H."""
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    x = x.clone().requires_grad_()
    shard = w[start:stop].clone().requires_grad_()
    log_pt, entropy = mkd.sharded_log_probs_and_entropy(x, shard, t, class_start=start, num_classes=w.shape[0],
                                                         **kwargs)
    loss = (log_pt * upstream[0].to(log_pt.dtype)).sum() + (entropy * upstream[1].to(entropy.dtype)).sum()
    outputs = log_pt.detach().clone(), entropy.detach().clone()
    entropy[0] = 0.0  # an in-place edit of an output (masking) must not reach the saved tensors
    gx, gw = torch.autograd.grad(loss, (x, shard))
    return (*outputs, gx, gw)


def _log_probs_argument_errors(rank, world_size):
    C, D = 10, 4
    torch.manual_seed(0)
    x, w, t = torch.randn(5, D), torch.randn(C, D), torch.randint(0, C, (5,))
    start, stop = mkd.shard_range(C, rank, world_size)

    def call(weight_shard=w[start:stop], target=t, **kw):
        kw = dict(dict(class_start=start, num_classes=C), **kw)
        return mkd.sharded_log_probs_and_entropy(x, weight_shard, target, **kw)

    with pytest.raises(ValueError, match=r"weight_shard must hold classes \[\d+, \d+\) on rank"):
        call(weight_shard=w)
    with pytest.raises(ValueError, match="temperature must lie in"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match=r"target holds class 10, outside \[0, 10\)"):
        call(target=torch.full((5,), C))
    # one rank alone with a bad argument: every rank raises, none waits in a collective
    with pytest.raises(ValueError, match="temperature must lie in|sharded_log_probs_and_entropy: rank"):
        call(temperature=-1.0 if rank == 0 else 1.0)
    # valid but different options on different ranks: a loss of no one's options (found by a review)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        call(temperature=1.0 + rank)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        call(ignore_index=-100 - rank)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        call(softcap=None if rank == 0 else 30.0)
    with pytest.raises(ValueError, match="softcap must lie in|sharded_log_probs_and_entropy: rank"):
        call(softcap=0.0)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        mkd.sharded_margin_cross_entropy(x, w[start:stop], t, class_start=start, num_classes=C, scale=64.0 + rank)
    # two options that differ so that a positional sum of their bits cancelled (scale × 4, m2 ÷ 2: a review)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        mkd.sharded_margin_cross_entropy(x, w[start:stop], t, class_start=start, num_classes=C,
                                         scale=64.0 if rank == 0 else 16.0, m2=0.25 if rank == 0 else 0.5)
    # equal options written differently: −0.0 and 0.0, a NumPy integer and an int
    mkd.sharded_margin_cross_entropy(x, w[start:stop], t, class_start=start, num_classes=C, m3=-0.0 if rank else 0.0,
                                     ignore_index=np.int64(-100) if rank else -100)
    return float(call()[0].sum())


class _FaceModel(torch.nn.Module):
    """A backbone and a sharded head in one model, the usual thing to hand to DDP."""

    def __init__(self, world_size):
        super().__init__()
        self.backbone = torch.nn.Linear(4, 4)
        self.head = mkd.ShardedArcFaceLoss(4, 2 * world_size)  # C divisible by W: every shard has one shape

    def forward(self, x, t):
        return self.head(mkd.gather_embeddings(self.backbone(x)), mkd.gather_embeddings(t))


def _ddp_whole_model(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)  # the backbones start alike, as DDP expects; the shards still differ (their own seeds)
    model = _FaceModel(world_size)
    shard = model.head.weight.detach().clone()
    names = mkd.keep_shards_out_of_ddp(model)
    ddp = DistributedDataParallel(model)
    kept = torch.equal(model.head.weight, shard)  # DDP did not broadcast rank 0's shard over this one
    torch.manual_seed(100 + rank)  # each rank its own rows
    ddp(torch.randn(3, 4), torch.randint(0, 2 * world_size, (3,))).backward()
    return names, kept, model.backbone.weight.grad, shard


def _dtensor_arguments(rank, world_size):
    """The losses given DTensors (FSDP2's sharded parameters, tensor-parallel shards): the error each raised.
    Cut Cross-Entropy #31 crashed on them (an illegal memory access); torch's own message asks to convert
    the other arguments to DTensors too, which cannot work."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    C, D, N = 12, 4, 6
    x, w, t = torch.randn(N, D), torch.randn(C, D), torch.randint(0, C, (N,))
    sharded, replicated = (distribute_tensor(w, mesh, [p]) for p in (Shard(0), Replicate()))
    calls = {
        "margin weight": lambda: mk.margin_cross_entropy(x, sharded, t),
        "linear weight": lambda: mk.linear_cross_entropy(x, replicated, t),
        "linear bias": lambda: mk.linear_cross_entropy(x, w, t, bias=distribute_tensor(torch.zeros(C), mesh, [Shard(0)])),
        "emo cost": lambda: mk.emo_loss(x, w, t, cost_embedding=sharded),
        "linear input": lambda: mk.linear_cross_entropy(distribute_tensor(x, mesh, [Replicate()]), w, t),
        "sharded weight_shard": lambda: mkd.sharded_margin_cross_entropy(x, sharded, t, class_start=0,
                                                                         num_classes=C),
        "cosent scores": lambda: mk.cosent_loss(distribute_tensor(torch.randn(N), mesh, [Replicate()]), t.float()),
    }
    messages = {}
    for name, call in calls.items():
        with pytest.raises(TypeError) as error:
            call()
        messages[name] = str(error.value)
    return messages


def _fsdp2_head_step(rank, world_size, x, w, t):
    """An LM head under FSDP2 with the loss in its forward (where FSDP has gathered the weight): loss, dL/dx
    and the whole dL/dw; and the error of the same loss called outside, on the sharded DTensor weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(w.clone())

        def forward(self, hidden, target):
            return mk.linear_cross_entropy(hidden, self.weight, target, z_loss=1e-3)

    head = fully_shard(Head(), mesh=init_device_mesh("cpu", (world_size,)))
    x = x.clone().requires_grad_()
    loss = head(x, t)
    loss.backward()
    with pytest.raises(TypeError) as outside:
        mk.linear_cross_entropy(x, head.weight, t)
    return loss.detach(), x.grad, head.weight.grad.full_tensor(), str(outside.value)


def _misuse(rank, world_size, what):
    """One misuse of the sharded loss; returns the error message every rank got (none may hang)."""
    C, D, N = 10, 4, 6
    torch.manual_seed(0)
    x, w, t = torch.randn(N, D), torch.randn(C, D), torch.randint(0, C, (N,))
    num_classes, class_start = C, mkd.shard_range(C, rank, world_size)[0]
    if what == "one rank's argument":
        class_start += rank == 1  # a mistake on rank 1 alone
    elif what == "rows not gathered":
        torch.manual_seed(rank)  # each rank its own rows, the same batch size (gather_embeddings forgotten)
        x = torch.randn(N, D)
    elif what == "num_classes":
        num_classes = C + (rank == 1)  # rank 1's shards leave class C // W... to nobody
        class_start = mkd.shard_range(num_classes, rank, world_size)[0]
    start, stop = mkd.shard_range(num_classes, rank, world_size)
    try:
        if what == "modes":
            module = mkd.ShardedArcFaceLoss(D, C, sample_rate=0.5)
            module.train(rank == 0)  # rank 0 samples classes, the others use every class
            module(x, t)
        elif what == "sample rates":  # all in train mode, rank 1 built without sampling
            mkd.ShardedArcFaceLoss(D, C, sample_rate=1.0 if rank == 1 else 0.5)(x, t)
        else:
            mkd.sharded_margin_cross_entropy(x, w[start:stop] if what != "num_classes" else torch.randn(stop - start, D),
                                             t, class_start=class_start, num_classes=num_classes)
    except ValueError as e:
        return str(e)
    return "no error"


# ---- tests -------------------------------------------------------------------------------------------------

OPTIONS = {
    "arcface": dict(),
    "cosface": dict(m2=0.0, m3=0.35),
    "sphereface": dict(m1=4.0, m2=0.0, scale=30.0),
    "combined+smoothing": dict(m1=1.2, m2=0.3, m3=0.15, scale=32.0, label_smoothing=0.1),
    "straight_through": dict(margin_grad="straight_through"),
    "lsoftmax": dict(m1=3.0, m2=0.0, scale=1.0, normalize=False),
    "lsoftmax+smoothing": dict(m1=1.5, m2=0.2, m3=0.1, scale=0.5, normalize=False, label_smoothing=0.2),
}


def make_case(N, C, D, dtype, ignore=(), ignore_index=-100, classes=None):
    x = torch.randn(N, D, dtype=torch.float64).to(dtype)
    w = torch.randn(C, D, dtype=torch.float64).to(dtype)
    low, high = classes or (0, C)
    t = torch.randint(low, high, (N,))
    t[list(ignore)] = ignore_index
    return x, w, t


def single_process(x, w, t, kwargs, loss_fn=mk.margin_cross_entropy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(x, w, t, **kwargs)
    gx, gw = torch.autograd.grad(loss.sum(), (x, w))
    return loss.detach(), gx, gw


def check_sharded(world, x, w, t, dtype=torch.float64, backend=None, autocast=False, **kwargs):
    """The sharded result equals the single-process one; loss and dL/dinput are identical on every rank."""
    results = world.run(_sharded_loss_and_grads, x, w, t, kwargs, backend, autocast)
    loss, gx, _ = results[0]
    K = kwargs.get("subcenters", 1)
    for r, (loss_r, gx_r, gw_r) in enumerate(results):
        assert torch.equal(loss_r, loss) and torch.equal(gx_r, gx), f"rank {r} differs from rank 0"
        start, stop = mkd.shard_range(w.shape[0] // K, r, world.size)
        assert gw_r.shape == ((stop - start) * K, w.shape[1]) and gw_r.dtype == dtype
    want_loss, want_gx, want_gw = single_process(x, w, t, kwargs)
    assert loss.dtype == want_loss.dtype and gx.dtype == dtype
    assert_close_rel(loss, want_loss, dtype, "loss", floor=64.0)
    assert_close_rel(gx, want_gx, dtype, "grad input")
    assert_close_rel(torch.cat([gw for _, _, gw in results]), want_gw, dtype, "grad weight")
    if dtype == torch.float64:  # and the plain-PyTorch oracle, which shares no code with margin_ce.py
        oracle_loss, oracle_gx, oracle_gw = single_process(x, w, t, kwargs, reference.margin_cross_entropy)
        assert_close_rel(loss, oracle_loss, dtype, "loss vs oracle", floor=64.0)
        assert_close_rel(gx, oracle_gx, dtype, "grad input vs oracle")
        assert_close_rel(torch.cat([gw for _, _, gw in results]), oracle_gw, dtype, "grad weight vs oracle")
    return loss, gx


def test_shard_range_is_insightface_rule_and_tiles_the_classes():
    assert [mkd.shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    for C in (1, 5, 29, 1000):
        for W in (1, 2, 3, 8):
            ranges = [mkd.shard_range(C, r, W) for r in range(W)]
            assert ranges[0][0] == 0 and ranges[-1][1] == C
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    with pytest.raises(ValueError, match="rank must lie in"):
        mkd.shard_range(10, 3, 3)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_single_process_fp64(world, name):
    # C = 29 splits unevenly over 2 and 3 ranks; rows 0 and 5 are ignored
    x, w, t = make_case(13, 29, 7, torch.float64, ignore=(0, 5))
    check_sharded(world, x, w, t, **OPTIONS[name])


@pytest.mark.parametrize("name", ["arcface", "combined+smoothing", "lsoftmax"])
def test_matches_single_process_fp32(world, name):
    x, w, t = make_case(40, 301, 16, torch.float32, ignore=(3,))
    check_sharded(world, x, w, t, torch.float32, **OPTIONS[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_single_process_16bit(world, dtype):
    x, w, t = make_case(24, 67, 16, dtype)
    check_sharded(world, x, w, t, dtype, m2=0.3)


def test_lambda_matches_single_process(world):
    # A-Softmax's λ: target math only, computed where the target's class lives
    x, w, t = make_case(13, 29, 7, torch.float64, ignore=(0, 5))
    check_sharded(world, x, w, t, m1=4.0, m2=0.0, scale=8.0, lambda_=3.0)


@pytest.mark.parametrize("K, dtype", [(2, torch.float64), (3, torch.float32)])
def test_subcenters_match_single_process(world, K, dtype):
    # C = 29 classes of K rows each, uneven over 2 and 3 ranks; on the CPU the PyTorch tiles serve the shards
    x, w, t = make_case(13, 29 * K, 7, dtype, ignore=(0, 5))
    t = torch.where(t == -100, t, t % 29)
    check_sharded(world, x, w, t, dtype, subcenters=K, label_smoothing=0.1)


@pytest.mark.parametrize("name", ["arcface", "lsoftmax+smoothing"])
def test_reference_tiles_backend(world, name):
    # MARGINKERN_BACKEND=reference: the engine's Python chunk loop calls the dW finalize hook per chunk
    x, w, t = make_case(11, 31, 5, torch.float64, ignore=(2,))
    check_sharded(world, x, w, t, backend="reference", **OPTIONS[name])


def test_autocast_does_not_lower_the_engine_precision(world):
    # the reference tiles' GEMMs run as plain torch ops: bf16 autocast would round them to 2^-8
    x, w, t = make_case(10, 40, 16, torch.float32)
    check_sharded(world, x, w, t, torch.float32, backend="reference", autocast=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_ignore_index(world, reduction):
    x, w, t = make_case(17, 23, 6, torch.float64, ignore=(1, 7, 8), ignore_index=7)
    loss, _ = check_sharded(world, x, w, t, reduction=reduction, ignore_index=7, label_smoothing=0.1)
    if reduction == "none":
        assert loss.shape == (17,) and (loss[[1, 7, 8]] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored(world, reduction):
    x, w, t = make_case(6, 11, 4, torch.float64, ignore=range(6))
    loss, gx = check_sharded(world, x, w, t, reduction=reduction)
    assert float(loss) == 0.0 and not gx.any()


@pytest.mark.parametrize("name", ["arcface", "lsoftmax+smoothing"])
def test_ranks_without_targets(world, name):
    # every target lies in rank 0's shard: the other ranks own no row (L-Softmax: no radial dW term there)
    C = 20
    _, stop0 = mkd.shard_range(C, 0, world.size)
    x, w, t = make_case(9, C, 5, torch.float64, ignore=(4,), classes=(0, stop0))
    check_sharded(world, x, w, t, **OPTIONS[name])


@pytest.mark.parametrize("extra_classes", [0, 1])
def test_one_or_two_classes_per_rank(world, extra_classes):
    x, w, t = make_case(8, world.size + extra_classes, 3, torch.float64)
    check_sharded(world, x, w, t, label_smoothing=0.05)


def test_empty_batch(world):
    x, w, t = make_case(0, 10, 4, torch.float64)
    loss, gx = check_sharded(world, x, w, t)
    assert float(loss) == 0.0 and gx.shape == (0, 4)


def test_module_owns_its_shard_and_matches_the_full_loss(world):
    D, C = 16, 50
    x, _, t = make_case(12, C, D, torch.float32)
    results = world.run(_module_shards, D, C, x, t)
    shards = [weight for weight, _, _ in results]
    assert not torch.equal(shards[0][:5], shards[1][:5]), "ranks seeded alike drew identical shards"
    full = torch.cat(shards)
    assert 0.008 < float(full.std()) < 0.012  # N(0, 0.01), as PartialFC_V2
    want_loss, _, want_gw = single_process(x, full, t, dict(m2=0.4))
    for _, loss, _ in results:
        assert_close_rel(loss, want_loss, torch.float32, "loss", floor=64.0)
    assert_close_rel(torch.cat([gw for _, _, gw in results]), want_gw, torch.float32, "grad weight")


# ignore_index 2: a valid position in a sample (review finding); K: sub-centres per class, whose sampled weight
# keeps all K rows of each sampled class
@pytest.mark.parametrize("ignore_index, K", [(-100, 1), (2, 1), (-100, 2)])
def test_class_sampling_is_the_loss_over_the_sampled_classes(world, ignore_index, K):
    D, C, rate = 8, 60, 0.25
    x, _, t = make_case(14, C, D, torch.float64, ignore=(2,), ignore_index=ignore_index)
    results = world.run(_sampled_module_step, D, C, x, t, rate, ignore_index, K)
    losses, grads, sampled, step_targets, starts, indices, class_starts, shards, full_losses = zip(*results)
    assert all(torch.equal(loss, losses[0]) for loss in losses)
    # the step's classes: every rank's sampled rows in rank order; each row's class id is its owner's
    weight = torch.cat(sampled)
    classes = weight.unflatten(0, (-1, K))  # (classes of the step, K, D)
    valid = t != ignore_index
    owner = torch.tensor([max(r for r in range(world.size) if class_starts[r] <= c) if v else 0
                          for c, v in zip(t, valid)])
    target = torch.stack(step_targets)[owner, torch.arange(len(t))]
    assert (target[~valid] == -1).all()
    assert torch.equal(classes[target[valid]], torch.cat(shards).unflatten(0, (-1, K))[t[valid]])  # targets kept
    for r in range(world.size):  # max(int(rate·C_r), the rank's own target classes) classes, exactly
        local_classes = shards[r].shape[0] // K
        own = torch.unique(t[valid & (t >= class_starts[r]) & (t < class_starts[r] + local_classes)])
        assert indices[r].numel() == max(int(rate * local_classes), own.numel())
        assert starts[r] == sum(len(s) // K for s in sampled[:r])
    options = dict(m1=1.0, m2=0.3, m3=0.1, label_smoothing=0.1, subcenters=K)
    want_loss, _, want_gw = single_process(x, weight, target, dict(options, ignore_index=-1))
    assert_close_rel(losses[0], want_loss, torch.float64, "loss", floor=1.0)
    for r in range(world.size):
        grad, want = grads[r].unflatten(0, (-1, K)), want_gw.unflatten(0, (-1, K))
        start = starts[r]
        assert_close_rel(grad[indices[r]], want[start:start + len(indices[r])], torch.float64, "grad weight")
        unsampled = torch.ones(len(grad), dtype=torch.bool)
        unsampled[indices[r]] = False
        assert not grad[unsampled].any()
    # evaluation uses every class: the plain sharded loss over the concatenated shards
    eval_loss, _, _ = single_process(x, torch.cat(shards), t, dict(options, ignore_index=ignore_index))
    assert_close_rel(full_losses[0], eval_loss, torch.float64, "eval loss", floor=1.0)


def test_ranks_seeded_alike_sample_different_classes(world):
    # (all rows ignored: every sampled class is a random one) C_local = 40: 10 of 40 positions per draw
    draws = world.run(_draw_with_one_seed, 40 * world.size)
    for step in range(3):
        assert len({tuple(d[step].tolist()) for d in draws}) == world.size, [d[step] for d in draws]


def test_double_backward_raises_instead_of_a_wrong_answer(world):
    # review finding: create_graph=True gave a wrong Hessian-vector product without an error
    x, w, t = make_case(6, 11, 4, torch.float64)
    messages = world.run(_double_backward, x, w, t)
    assert all("differentiated twice" in m for m in messages), messages


def test_gather_embeddings_gives_the_ddp_scaled_gradient(world):
    # W × this rank's rows of the single-process gradient: DDP's average over ranks then gives it exactly
    x, w, t = make_case(4 * world.size, 19, 6, torch.float64)
    grads = world.run(_gathered_training_step, x, w, t)
    _, want_gx, _ = single_process(x, w, t, {})
    torch.testing.assert_close(torch.cat(grads) / world.size, want_gx, rtol=REL_TOL[torch.float64], atol=1e-14)


def _unequal_batches(rank, world_size):
    local = torch.randn(3 + rank, 4)
    with pytest.raises(ValueError, match=r"every rank must pass the same shape .*\(3, 4\), 'torch.float32'\), "
                                         r"\(\(4, 4\)"):
        mkd.gather_embeddings(local)
    with pytest.raises(ValueError, match="every rank must pass the same shape"):
        mkd.gather_embeddings(torch.arange(2 + rank))  # labels too
    with pytest.raises(ValueError, match="and dtype"):
        mkd.gather_embeddings(torch.ones(2, 4, dtype=torch.float64 if rank else torch.float32))
    with pytest.raises(ValueError, match="at most 7 dimensions"):  # on every rank, though only rank 0 has 8
        mkd.gather_embeddings(torch.ones((1,) * (8 if rank == 0 else 2)))
    return tuple(mkd.gather_embeddings(torch.ones(2, 4)).shape)  # the group still works


def _bad_argument_on_one_rank(rank, world_size):
    """An argument error on rank 1 alone, raised before any collective there, must raise on every rank (a review found
    rank 0 waiting in the next collective until the group's timeout): the module's embeddings, and
    gather_embeddings' argument."""
    D, C = 4, 12
    bad = rank == 1
    for sample_rate in (1.0, 0.5):
        module = mkd.ShardedArcFaceLoss(D, C, sample_rate=sample_rate)
        t = torch.arange(6) % C
        for embeddings, match in ((torch.randn(6, D + bad), "embeddings must have shape"),
                                  (None if bad else torch.randn(6, D), "embeddings must be a torch.Tensor")):
            with pytest.raises(ValueError if embeddings is not None or not bad else TypeError,
                               match=f"{match}|rank\\(s\\) \\[1\\] of \\d got invalid arguments"):
                module(embeddings, t)
    with pytest.raises(ValueError, match=r"local must be a tensor of rows|rank\(s\) \[1\] passed no tensor of rows"):
        mkd.gather_embeddings(None if bad else torch.ones(2, 4))
    return tuple(mkd.gather_embeddings(torch.ones(2, 4)).shape)  # the group still works


def test_bad_argument_on_one_rank_raises_on_every_rank(world):
    assert world.run(_bad_argument_on_one_rank) == [(2 * world.size, 4)] * world.size


def test_gather_embeddings_refuses_unequal_batches(world):
    # face_margin_anchors.md: PartialFC needs a constant batch size per rank; unequal ones must not hang
    assert world.run(_unequal_batches) == [(2 * world.size, 4)] * world.size


def test_subgroup_of_one_rank(world):
    x, w, t = make_case(7, 9, 4, torch.float64, ignore=(2,))
    results = world.run(_single_member_group, x, w, t)
    want_loss, want_gx, _ = single_process(x, w, t, {})
    loss, gx = results[0]
    assert_close_rel(loss, want_loss, torch.float64, "loss", floor=64.0)
    assert_close_rel(gx, want_gx, torch.float64, "grad input")


def test_argument_errors(world):
    assert len(set(world.run(_argument_errors))) == 1


def test_ddp_leaves_each_ranks_shard_alone(world):
    results = world.run(_ddp_whole_model)
    assert all(names == ["head.weight"] and kept for names, kept, _, _ in results)
    assert all(torch.equal(grad, results[0][2]) for _, _, grad, _ in results)  # the backbone is averaged
    assert not torch.equal(results[0][3], results[1][3])  # and the shards are each rank's own


@pytest.mark.skipif(not hasattr(torch.cpu.Stream, "record_event"),
                    reason="this torch's FSDP2 cannot run on the CPU (torch.cpu.Stream has no record_event: torch 2.6)")
def test_fsdp2_head_with_the_loss_in_its_forward(world):
    torch.manual_seed(0)
    x, w, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64), torch.randint(0, 11, (6,))
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = mk.linear_cross_entropy(x_ref, w_ref, t, z_loss=1e-3)
    want.backward()
    for loss, gx, gw, outside in world.run(_fsdp2_head_step, x, w, t):
        assert_close_rel(loss, want.detach(), torch.float64, "loss")
        assert_close_rel(gx, x_ref.grad, torch.float64, "grad input")
        assert_close_rel(gw, w_ref.grad, torch.float64, "grad weight")
        assert outside.startswith("weight is a DTensor"), outside


def test_dtensor_arguments_get_a_clear_error(world):
    for messages in world.run(_dtensor_arguments):
        for name, message in messages.items():
            argument = name.split()[1].replace("cost", "cost_embedding")
            assert message.startswith(f"{argument} is a DTensor (placements ("), (name, message)
            assert "full_tensor()" in message and "to_local()" in message, (name, message)


@pytest.mark.parametrize("what,match", [
    ("one rank's argument", r"class_start must be|rank\(s\) \[1\] of \d got invalid arguments"),
    ("rows not gathered", r"input and target \(and per-row margins, hard-negative coefficients\) must be the same"),
    ("num_classes", "every rank must pass the same num_classes"),
    ("modes", "every rank must be in the same mode"),
    ("sample rates", r"same mode \(train or eval\) with the same sample_rate"),
])
def test_misuse_raises_on_every_rank_instead_of_a_hang_or_a_wrong_loss(world, what, match):
    import re
    messages = world.run(_misuse, what)
    assert all(re.search(match, m) for m in messages), messages


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("this process already belongs to a process group")
    x, w, t = make_case(3, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match="group: torch.distributed is not initialised"):
        mkd.sharded_margin_cross_entropy(x, w, t, class_start=0, num_classes=4)
    with pytest.raises(RuntimeError, match="group: torch.distributed is not initialised"):
        mkd.ShardedArcFaceLoss(2, 4)


# ---- vocab-parallel per-token log-probs and entropy ----------------------------------------------------------

def check_sharded_log_probs(world, x, w, t, dtype=torch.float64, **kwargs):
    """sharded_log_probs_and_entropy equals the single-process log_probs_and_entropy: outputs and dL/dinput
    identical on every rank, the slices of dL/dweight concatenated."""
    upstream = (torch.randn(x.shape[0], dtype=torch.float64), torch.randn(x.shape[0], dtype=torch.float64))
    results = world.run(_sharded_log_probs_and_grads, x, w, t, kwargs, upstream)
    log_pt, entropy, gx, _ = results[0]
    for r, (lp_r, h_r, gx_r, _) in enumerate(results):
        assert torch.equal(lp_r, log_pt) and torch.equal(h_r, entropy) and torch.equal(gx_r, gx), f"rank {r} differs"
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    want_lp, want_h = mk.log_probs_and_entropy(xs, ws, t, **kwargs)
    want_gx, want_gw = torch.autograd.grad((want_lp * upstream[0].to(dtype)).sum() + (want_h * upstream[1].to(dtype)).sum(),
                                           (xs, ws))
    assert_close_rel(log_pt, want_lp, dtype, "log p_t", floor=1.0)
    assert_close_rel(entropy, want_h, dtype, "entropy", floor=1.0)
    assert_close_rel(gx, want_gx, dtype, "grad input")
    assert_close_rel(torch.cat([gw for *_, gw in results]), want_gw, dtype, "grad weight")
    return log_pt, entropy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_sharded_log_probs_match_single_process(world, dtype, softcap):
    """(softcap: Gemma's, before the temperature; 2 bites on these logits)"""
    x, w, t = make_case(13, 29, 7, dtype, ignore=(0, 5))
    check_sharded_log_probs(world, x, w, t, dtype, temperature=0.7, softcap=softcap)


def test_sharded_log_probs_with_targets_on_one_rank_and_ignored_rows(world):
    x, w, t = make_case(9, 31, 5, torch.float64, ignore=(2,), ignore_index=-1, classes=(0, 5))  # targets on rank 0
    check_sharded_log_probs(world, x, w, t, ignore_index=-1)


def test_sharded_log_probs_stay_exact_for_confident_rows(world):
    """The max on one rank and the rest far below on others: the ranks' (M, S′, T) merge without cancelling,
    so a confident row's entropy and log p_t keep their digits (as unsharded)."""
    from tests.test_log_probs import exact_entropy
    torch.manual_seed(3)
    N, C, D = 12, 30, 16
    w = torch.randn(C, D, dtype=torch.float64)
    t = torch.randint(0, C, (N,))
    x = torch.linspace(1.0, 6.0, N, dtype=torch.float64)[:, None] * w[t] + 0.1 * torch.randn(N, D, dtype=torch.float64)
    x, w = x.float(), w.float()
    _, entropy = check_sharded_log_probs(world, x, w, t, torch.float32)
    want = exact_entropy(x, w)
    err = ((entropy.double() - want).abs() / want)[want > 1e-30]
    assert (entropy >= 0).all() and err.max() < 1e-3 and want.min() < 1e-12, (err.max(), want.min())


def test_sharded_log_probs_argument_errors(world):
    values = world.run(_log_probs_argument_errors)
    assert all(v == values[0] for v in values)


# ---- vocab-parallel distillation ---------------------------------------------------------------------------------

def _sharded_kl_and_grads(rank, world_size, x, w, x_t, w_t, t, kwargs, upstream, loss="sharded_linear_kl_divergence"):
    """(KL (or JSD) per row, dL/dinput, dL/dweight_shard) of this rank for the loss Σ upstream·KL."""
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    x = x.clone().requires_grad_()
    shard = w[start:stop].clone().requires_grad_()
    kl = getattr(mkd, loss)(x, shard, x_t, w_t[start:stop], t, class_start=start, num_classes=w.shape[0],
                            reduction="none", **kwargs)
    gx, gw = torch.autograd.grad((kl * upstream.to(kl.dtype)).sum(), (x, shard))
    return kl.detach(), gx, gw


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sharded_kl_divergence_matches_single_process(world, direction, dtype):
    x, w, t = make_case(13, 29, 7, dtype, ignore=(0, 5))
    x_t, w_t = torch.randn(13, 5, dtype=torch.float64).to(dtype), torch.randn(29, 5, dtype=torch.float64).to(dtype)
    upstream = torch.randn(13, dtype=torch.float64)
    kwargs = dict(temperature=1.5, direction=direction)
    results = world.run(_sharded_kl_and_grads, x, w, x_t, w_t, t, kwargs, upstream)
    kl, gx, _ = results[0]
    for r, (kl_r, gx_r, _) in enumerate(results):
        assert torch.equal(kl_r, kl) and torch.equal(gx_r, gx), f"rank {r} differs from rank 0"
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = mk.linear_kl_divergence(xs, ws, x_t, w_t, t, reduction="none", **kwargs)
    want_gx, want_gw = torch.autograd.grad((want * upstream.to(dtype)).sum(), (xs, ws))
    factor = 4.0 if direction == "reverse" else 1.0  # tests/test_distill.py says why
    assert_close_rel(kl, want, dtype, "kl", floor=1.0, factor=factor)
    assert_close_rel(gx, want_gx, dtype, "grad input", factor=factor)
    assert_close_rel(torch.cat([gw for *_, gw in results]), want_gw, dtype, "grad weight", factor=factor)


@pytest.mark.parametrize("skip", [True, False])
def test_sharded_log_probs_and_kl_skip_ignored_rows(world, skip):
    """skip_ignored_rows in the vocab-parallel log-probs and distillation: every rank leaves out the same (prompt)
    rows; outputs and gradients as the single-process functions' (0 on the ignored rows)."""
    x, w, t = make_case(16, 29, 7, torch.float64, ignore=range(8))
    log_pt, _ = check_sharded_log_probs(world, x, w, t, skip_ignored_rows=skip)
    assert not log_pt[:8].any()
    x_t, w_t = torch.randn(16, 5, dtype=torch.float64), torch.randn(29, 5, dtype=torch.float64)
    upstream = torch.randn(16, dtype=torch.float64)
    for kwargs in (dict(direction="reverse"), dict(beta=0.3)):
        kwargs = dict(kwargs, skip_ignored_rows=skip)
        loss = "sharded_linear_jsd" if "beta" in kwargs else "sharded_linear_kl_divergence"
        results = world.run(_sharded_kl_and_grads, x, w, x_t, w_t, t, kwargs, upstream, loss)
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn = mk.linear_jsd if "beta" in kwargs else mk.linear_kl_divergence
        want = fn(xs, ws, x_t, w_t, t, reduction="none", **kwargs)
        want_gx, want_gw = torch.autograd.grad((want * upstream).sum(), (xs, ws))
        kl, gx, _ = results[0]
        assert_close_rel(kl, want, torch.float64, "divergence", floor=1.0)
        assert_close_rel(gx, want_gx, torch.float64, "grad input")
        assert_close_rel(torch.cat([gw for *_, gw in results]), want_gw, torch.float64, "grad weight")


def _kl_options_differ(rank, world_size):
    torch.manual_seed(0)
    x, w, x_t, w_t = torch.randn(5, 4), torch.randn(10, 4), torch.randn(5, 3), torch.randn(10, 3)
    start, stop = mkd.shard_range(10, rank, world_size)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        mkd.sharded_linear_kl_divergence(x, w[start:stop], x_t, w_t[start:stop], class_start=start, num_classes=10,
                                         direction="forward" if rank == 0 else "reverse")
    return True


def test_sharded_kl_divergence_refuses_different_options(world):
    assert all(world.run(_kl_options_differ))


# ---- vocab-parallel linear cross-entropy -------------------------------------------------------------------------

@contextlib.contextmanager
def _backend(backend):
    """MARGINKERN_BACKEND=backend in this worker for the block (None: the default dispatch)."""
    if backend is not None:
        os.environ["MARGINKERN_BACKEND"] = backend
    try:
        yield
    finally:
        os.environ.pop("MARGINKERN_BACKEND", None)


def _rank_rows(x, w, rank, world_size):
    """(start, input, this rank's rows of w), both requiring grad: a task's inputs for a class-sharded loss."""
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    return start, x.clone().requires_grad_(), w[start:stop].clone().requires_grad_()


def _sharded_lce_and_grads(rank, world_size, x, w, bias, t, kwargs, upstream, backend=None, class_weight=None):
    """(loss, dL/dinput, dL/dweight_shard, dL/dbias_shard or None) of this rank for the loss Σ upstream·loss."""
    with _backend(backend):
        start, x, shard = _rank_rows(x, w, rank, world_size)
        stop = start + shard.shape[0]
        bias_shard = None if bias is None else bias[start:stop].clone().requires_grad_()
        if class_weight is not None:
            kwargs = dict(kwargs, class_weight_shard=class_weight[start:stop])
        loss = mkd.sharded_linear_cross_entropy(x, shard, t, bias_shard, class_start=start, num_classes=w.shape[0],
                                                **kwargs)
        grads = torch.autograd.grad((loss * upstream.to(loss.dtype).reshape(loss.shape)).sum(),
                                    [v for v in (x, shard, bias_shard) if v is not None])
        return (loss.detach(), *grads) + ((None,) if bias is None else ())


def check_sharded_lce(world, x, w, t, dtype=torch.float64, bias=None, backend=None, class_weight=None, **kwargs):
    """sharded_linear_cross_entropy equals the single-process linear_cross_entropy with the concatenated head (and
    class weights): loss and dL/dinput identical on every rank, the slices of dL/dweight and dL/dbias concatenated."""
    reduction = kwargs.setdefault("reduction", "none")
    upstream = torch.randn(t.shape if reduction == "none" else (), dtype=torch.float64)
    results = world.run(_sharded_lce_and_grads, x, w, bias, t, kwargs, upstream, backend, class_weight)
    loss, gx, *_ = results[0]
    for r, (loss_r, gx_r, gw_r, _) in enumerate(results):
        assert torch.equal(loss_r, loss) and torch.equal(gx_r, gx), f"rank {r} differs from rank 0"
        start, stop = mkd.shard_range(w.shape[0], r, world.size)
        assert gw_r.shape == (stop - start, w.shape[1]) and gw_r.dtype == dtype
    inputs = [v.clone().requires_grad_() for v in (x, w) + (() if bias is None else (bias,))]
    want = mk.linear_cross_entropy(*inputs[:2], t, *inputs[2:], class_weight=class_weight, **kwargs)
    want_grads = torch.autograd.grad((want * upstream.to(want.dtype)).sum(), inputs)
    assert loss.shape == want.shape and loss.dtype == want.dtype
    assert_close_rel(loss, want, dtype, "loss", floor=1.0)
    assert_close_rel(gx, want_grads[0], dtype, "grad input")
    assert_close_rel(torch.cat([r[2] for r in results]), want_grads[1], dtype, "grad weight")
    if bias is not None:
        assert_close_rel(torch.cat([r[3] for r in results]), want_grads[2], dtype, "grad bias")
    return loss


LCE_OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "focal": dict(focal_gamma=2.0),
    "gamma_ce": dict(gamma_ce=0.5),
    "all": dict(label_smoothing=0.2, z_loss=1e-3, softcap=5.0),
}


@pytest.mark.parametrize("name", list(LCE_OPTIONS))
def test_sharded_linear_ce_matches_single_process_fp64(world, name):
    x, w, t = make_case(13, 29, 7, torch.float64, ignore=(0, 5))
    bias = torch.randn(29, dtype=torch.float64) if name in ("plain", "all") else None
    check_sharded_lce(world, x, w, t, bias=bias, **LCE_OPTIONS[name])


@pytest.mark.parametrize("backend", [None, "reference"])
def test_sharded_linear_ce_matches_single_process_fp32(world, backend):
    """fp32 on the default tiles (C++ when built) and on the PyTorch tiles."""
    x, w, t = make_case(33, 101, 16, torch.float32, ignore=(3,))
    check_sharded_lce(world, x, w, t, torch.float32, bias=torch.randn(101), backend=backend, label_smoothing=0.1,
                      z_loss=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sharded_linear_ce_reductions_and_targets_on_one_rank(world, reduction):
    x, w, t = make_case(9, 31, 5, torch.float64, ignore=(2,), ignore_index=-1, classes=(0, 5))  # targets on rank 0
    check_sharded_lce(world, x, w, t, ignore_index=-1, reduction=reduction, label_smoothing=0.1)


def test_sharded_linear_ce_all_rows_ignored_is_zero(world):
    x, w, t = make_case(6, 10, 4, torch.float64, ignore=range(6))
    loss = check_sharded_lce(world, x, w, t, reduction="mean")
    assert loss.item() == 0.0


def test_sharded_linear_ce_token_batches_and_shift(world):
    """(B, T, D) hidden states with causal-LM labels as they come (shift=1), as the unsharded function."""
    x, w, t = make_case(2 * 7, 23, 6, torch.float64, ignore=(4,))
    check_sharded_lce(world, x.reshape(2, 7, 6), w, t.reshape(2, 7), shift=1, softcap=4.0)
    check_sharded_lce(world, x.reshape(2, 7, 6), w, t.reshape(2, 7), shift=1, reduction="mean")


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3), dict(focal_gamma=2.0)])
def test_sharded_linear_ce_class_weights(world, reduction, opts):
    """class_weight_shard: each rank's slice of the class weights; c_t from the rank holding the target, c̄ over all
    ranks, the weighted smoothing sums merged, the rank-1 gradient terms local (a bias shard included)."""
    x, w, t = make_case(17, 31, 6, torch.float64, ignore=(2,))
    c = torch.rand(31, dtype=torch.float64) + 0.2
    c[t[5]] = 0.0
    check_sharded_lce(world, x, w, t, bias=torch.randn(31, dtype=torch.float64), class_weight=c, reduction=reduction,
                      **opts)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("opts", [dict(softcap=3.0), dict(label_smoothing=0.1, z_loss=1e-3)])
def test_sharded_linear_ce_token_scaling(world, reduction, opts):
    """token_scaling (DFT): p_t from the rank holding the target (a bias shard and class weights included); the
    scaled loss is far from the plain one here."""
    x, w, t = make_case(17, 31, 6, torch.float64, ignore=(2,))
    bias, c = torch.randn(31, dtype=torch.float64), torch.rand(31, dtype=torch.float64) + 0.2
    loss = check_sharded_lce(world, x, w, t, bias=bias, class_weight=c, reduction=reduction, token_scaling=True,
                             **opts)
    plain = mk.linear_cross_entropy(x, w, t, bias, class_weight=c, reduction=reduction, **opts)
    assert (loss - plain.detach()).abs().max() > 0.1


@pytest.mark.parametrize("skip", [True, False])
def test_sharded_linear_ce_skips_ignored_rows(world, skip):
    """skip_ignored_rows: every rank leaves out the same (prompt) rows; loss and gradients as the single-process
    function's, with DFT and a bias shard (the collectives see the labelled rows only)."""
    x, w, t = make_case(24, 31, 6, torch.float64, ignore=range(12))
    check_sharded_lce(world, x, w, t, bias=torch.randn(31, dtype=torch.float64), reduction="none",
                      token_scaling=True, skip_ignored_rows=skip)
    check_sharded_lce(world, x, w, t, reduction="mean", z_loss=1e-3, skip_ignored_rows=skip)


def _sharded_rows_seen(rank, world_size, x, w, t, loss, function, flop_counter_on_rank_0):
    """(the row counts this rank's `function` (an autograd Function of marginkern.distributed) was applied to, the
    loss) for sharded `loss` on every rank, rank 0 inside a FlopCounterMode if asked (a dispatch mode: no skipping)."""
    from torch.utils.flop_counter import FlopCounterMode
    seen, cls = [], getattr(mkd, function)
    apply = cls.apply

    def spy(*args):
        seen.append(args[0].shape[0])
        return apply(*args)
    cls.apply = spy
    try:
        start, shard = _rank_rows(x, w, rank, world_size)[0], w[slice(*mkd.shard_range(w.shape[0], rank, world_size))]
        mode = FlopCounterMode(display=False) if flop_counter_on_rank_0 and rank == 0 else contextlib.nullcontext()
        with mode:
            out = getattr(mkd, loss)(x, shard, t, class_start=start, num_classes=w.shape[0])
        return seen, (out[0] if isinstance(out, tuple) else out).detach()
    finally:
        cls.apply = apply


@pytest.mark.parametrize("loss, function", [("sharded_linear_cross_entropy", "_ShardedLinearCrossEntropy"),
                                            ("sharded_log_probs_and_entropy", "_ShardedLogProbsEntropy")])
def test_sharded_losses_skip_rows_only_when_every_rank_can(world, loss, function):
    """Every rank runs the labelled rows alone, or, when one rank cannot skip (a dispatch mode there), every row: a
    per-rank decision would give the collectives different sizes (a crash or a hang)."""
    x, w, t = make_case(16, 29, 7, torch.float64, ignore=range(8))
    skipped = world.run(_sharded_rows_seen, x, w, t, loss, function, False)
    assert all(seen == [8] for seen, _ in skipped)
    every_row = world.run(_sharded_rows_seen, x, w, t, loss, function, True)
    assert all(seen == [16] for seen, _ in every_row)
    torch.testing.assert_close(every_row[0][1], skipped[0][1])


def _sharded_lce_extras(rank, world_size, x, w, t, kwargs, upstream):
    """(loss, lse, accuracy, dL/dinput, dL/dweight_shard) of this rank with return_lse and return_token_accuracy, for
    the loss Σ upstream·loss + Σ lse² (the lse's own gradient through the backward's collectives)."""
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    x = x.clone().requires_grad_()
    shard = w[start:stop].clone().requires_grad_()
    loss, lse, accuracy = mkd.sharded_linear_cross_entropy(x, shard, t, class_start=start, num_classes=w.shape[0],
                                                           return_lse=True, return_token_accuracy=True, **kwargs)
    total = (loss * upstream.reshape(loss.shape)).sum() + (lse * lse).sum()
    return (loss.detach(), lse.detach(), accuracy, *torch.autograd.grad(total, (x, shard)))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sharded_linear_ce_returns_lse_and_token_accuracy(world, reduction):
    """The returned lse (with its gradient) and the token accuracy equal the single-process ones: the accuracy needs
    the ranks' row maxima (one all-reduce MAX), the targets of even rows are their argmax."""
    x, w, t = make_case(21, 29, 7, torch.float64, ignore=(1,))
    t[::2] = (x.detach() @ w.detach().t()).argmax(1)[::2]
    kwargs = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    upstream = torch.randn(t.shape if reduction == "none" else (), dtype=torch.float64)
    results = world.run(_sharded_lce_extras, x, w, t, kwargs, upstream)
    inputs = [v.detach().clone().requires_grad_() for v in (x, w)]
    loss, lse, accuracy = mk.linear_cross_entropy(*inputs, t, return_lse=True, return_token_accuracy=True, **kwargs)
    want_gx, want_gw = torch.autograd.grad((loss * upstream).sum() + (lse * lse).sum(), inputs)
    for r, (loss_r, lse_r, acc_r, gx_r, gw_r) in enumerate(results):
        torch.testing.assert_close(loss_r, loss.detach())
        torch.testing.assert_close(lse_r, lse.detach())
        assert torch.equal(acc_r, accuracy), f"rank {r}: accuracy {acc_r} != {accuracy}"
        torch.testing.assert_close(gx_r, want_gx)
    torch.testing.assert_close(torch.cat([r[4] for r in results]), want_gw)
    assert accuracy.sum() >= (10 if reduction == "none" else 0.5)  # the argmax rows count (10 of 20 valid)


def _lce_argument_errors(rank, world_size):
    C, D = 10, 4
    torch.manual_seed(0)
    x, w, b, t = torch.randn(5, D), torch.randn(C, D), torch.randn(C), torch.randint(0, C, (5,))
    start, stop = mkd.shard_range(C, rank, world_size)

    def call(weight_shard=w[start:stop], target=t, bias_shard=None, **kw):
        kw = dict(dict(class_start=start, num_classes=C), **kw)
        return mkd.sharded_linear_cross_entropy(x, weight_shard, target, bias_shard, **kw)

    with pytest.raises(ValueError, match=r"weight_shard must hold classes \[\d+, \d+\) on rank"):
        call(weight_shard=w)
    with pytest.raises(ValueError, match=r"bias_shard must have shape \(C=\d+,\)"):
        call(bias_shard=b)
    with pytest.raises(ValueError, match="label_smoothing"):
        call(label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"target holds class 10, outside \[0, 10\)"):
        call(target=torch.full((5,), C))
    # one rank alone with a bad argument: every rank raises, none waits in a collective
    with pytest.raises(ValueError, match="z_loss|sharded_linear_cross_entropy: rank"):
        call(z_loss=-1.0 if rank == 0 else 0.0)
    # valid but different options on different ranks: a loss of no one's options
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        call(softcap=None if rank == 0 else 30.0)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        call(bias_shard=b[start:stop] if rank == 0 else None)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        call(reduction="mean" if rank == 0 else "sum")
    with pytest.raises(ValueError, match="every rank must pass the same options"):  # would hang in its all-reduce
        call(return_token_accuracy=rank == 0)
    with pytest.raises(ValueError, match="every rank must pass the same options"):
        call(class_weight_shard=torch.ones(stop - start) if rank == 0 else None)
    with pytest.raises(ValueError, match=r"class_weight must have shape \(C=\d+,\)|sharded_linear_cross_entropy: rank"):
        call(class_weight_shard=torch.ones(C))
    # a loss that needs a gradient on one rank only (a frozen shard there, or no_grad): its backward collectives
    # would wait for the others forever (found by a review)
    needs = w[start:stop].clone().requires_grad_(rank == 0)
    with pytest.raises(ValueError, match=r"needs a gradient on rank\(s\) \[0\]"):
        call(weight_shard=needs)
    with torch.no_grad() if rank == 1 else contextlib.nullcontext():
        with pytest.raises(ValueError, match="needs a gradient on rank"):
            call(weight_shard=w[start:stop].clone().requires_grad_())
    with pytest.raises(ValueError, match="needs a gradient on rank"):
        mkd.sharded_margin_cross_entropy(x, needs, t, class_start=start, num_classes=C)
    with pytest.raises(ValueError, match="needs a gradient on rank"):
        mkd.sharded_log_probs_and_entropy(x, needs, t, class_start=start, num_classes=C)
    with pytest.raises(ValueError, match="needs a gradient on rank"):
        mkd.sharded_linear_jsd(x, needs, x[:, :2], w[start:stop, :2], class_start=start, num_classes=C)
    # frozen on every rank is fine, and so is a head trained on every rank with a frozen bias on some
    call(weight_shard=w[start:stop].clone())
    call(weight_shard=w[start:stop].clone().requires_grad_(), bias_shard=b[start:stop].clone().requires_grad_(rank == 0))
    return float(call())


def test_sharded_linear_ce_argument_errors(world):
    values = world.run(_lce_argument_errors)
    assert all(v == values[0] for v in values)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sharded_linear_jsd_matches_single_process(world, beta, dtype):
    x, w, t = make_case(13, 29, 7, dtype, ignore=(0, 5))
    x_t, w_t = torch.randn(13, 5, dtype=torch.float64).to(dtype), torch.randn(29, 5, dtype=torch.float64).to(dtype)
    upstream = torch.randn(13, dtype=torch.float64)
    kwargs = dict(temperature=1.5, beta=beta)
    results = world.run(_sharded_kl_and_grads, x, w, x_t, w_t, t, kwargs, upstream, "sharded_linear_jsd")
    jsd, gx, _ = results[0]
    for r, (jsd_r, gx_r, _) in enumerate(results):
        assert torch.equal(jsd_r, jsd) and torch.equal(gx_r, gx), f"rank {r} differs from rank 0"
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = mk.linear_jsd(xs, ws, x_t, w_t, t, reduction="none", **kwargs)
    want_gx, want_gw = torch.autograd.grad((want * upstream.to(dtype)).sum(), (xs, ws))
    factor = 4.0 if beta == 1.0 else 1.0  # reverse KL: tests/test_distill.py says why
    assert_close_rel(jsd, want, dtype, "jsd", floor=1.0, factor=factor)
    assert_close_rel(gx, want_gx, dtype, "grad input", factor=factor)
    assert_close_rel(torch.cat([gw for *_, gw in results]), want_gw, dtype, "grad weight", factor=factor)


def _jsd_options_differ(rank, world_size):
    torch.manual_seed(0)
    x, w, x_t, w_t = torch.randn(5, 4), torch.randn(10, 4), torch.randn(5, 3), torch.randn(10, 3)
    start, stop = mkd.shard_range(10, rank, world_size)

    def call(**kw):
        return mkd.sharded_linear_jsd(x, w[start:stop], x_t, w_t[start:stop], class_start=start, num_classes=10, **kw)

    with pytest.raises(ValueError, match="every rank must pass the same options"):
        call(beta=0.5 if rank == 0 else 0.25)
    # one rank alone with a bad beta: every rank raises, none waits in a collective
    with pytest.raises(ValueError, match=r"beta must lie in|sharded_linear_jsd: rank"):
        call(beta=1.5 if rank == 0 else 0.5)
    return float(call(beta=0.5))


def test_sharded_linear_jsd_argument_errors(world):
    values = world.run(_jsd_options_differ)
    assert all(v == values[0] for v in values)


@pytest.mark.parametrize("options", [dict(scale=8.0), dict(scale=1.0, m1=2.0, normalize=False, label_smoothing=0.1,
                                                          lambda_=0.5)], ids=["arcface-like", "l-softmax"])
def test_row_margins_match_single_process(world, options):
    """Per-row m2 (both signs) and m3 (AdaFace's, MagFace's) with the classes sharded: loss and the gradients of x,
    the shards and both margins equal the single-process ones, identical on every rank (each row's margin gradient
    comes from the rank that holds its target, summed over ranks)."""
    x, w, t = make_case(13, 29, 7, torch.float64, ignore=(0, 5))
    m2, m3 = torch.rand(13, dtype=torch.float64) - 0.5, 0.3 * torch.rand(13, dtype=torch.float64)
    results = world.run(_sharded_row_margin_grads, x, w, t, m2, m3, options)
    for r, result in enumerate(results):
        for name, a, b in zip(("loss", "grad input", "grad m2", "grad m3"), result[:2] + result[3:],
                              results[0][:2] + results[0][3:]):
            assert torch.equal(a, b), f"{name}: rank {r} differs from rank 0"
    a = [v.clone().requires_grad_() for v in (x, w, m2, m3)]
    want_loss = mk.margin_cross_entropy(a[0], a[1], t, m2=a[2], m3=a[3], **options)
    want = torch.autograd.grad(want_loss, a)
    loss, gx, _, gm2, gm3 = results[0]
    assert_close_rel(loss, want_loss, torch.float64, "loss")
    for name, got, expected in (("grad input", gx, want[0]), ("grad m2", gm2, want[2]), ("grad m3", gm3, want[3]),
                                ("grad weight", torch.cat([r[2] for r in results]), want[1])):
        assert_close_rel(got, expected, torch.float64, name)


def _differing_row_margins(rank, world_size, x, w, t, m):
    with pytest.raises(ValueError, match=r"input and target \(and per-row margins, hard-negative coefficients\) must"):
        _sharded_row_margin_grads(rank, world_size, x, w, t, m, m, {}, differ=True)
    return True


def test_row_margins_that_differ_across_ranks_raise_on_every_rank(world):
    x, w, t = make_case(13, 29, 7, torch.float64)
    assert world.run(_differing_row_margins, x, w, t, torch.rand(13, dtype=torch.float64)) == [True] * world.size


@pytest.mark.parametrize("kind", list(STEP_MODULES))
def test_sharded_adaptive_margin_modules_match_the_single_process_ones(world, kind):
    """Sharded AdaFace (its running statistics over two steps), MagFace (its regulariser), CurricularFace (its t,
    each row's threshold from its target's rank), MV-Softmax, inter-class filtering and ElasticFace (rank 0's draws
    on every rank) against the single-process modules with the same
    class centres: losses, dL/dx, the shards' gradients, the statistics, identical ranks."""
    D, C = 8, 29
    x, w, t = make_case(13, C, D, torch.float64, ignore=(4,))
    x = x * 3
    x[::2] = 3 * w[t[::2].clamp_min(0)]  # rows near their centre: few hard negatives there, many elsewhere
    results = world.run(_adaptive_module_steps, kind, D, C, x, t, w)
    _, name, kwargs, buffers = STEP_MODULES[kind]
    single = getattr(mk, name)(D, C, scale=16.0, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        single.weight.copy_(w)
    torch.manual_seed(10)  # rank 0's seed (ElasticFace's draws)
    for step in range(2):
        xs = (x * (1 + step)).clone().requires_grad_()
        want = single(xs, t)
        want_gx, want_gw = torch.autograd.grad(want, (xs, single.weight))
        for losses, grads_x, _, _ in results:
            assert torch.equal(losses[step], results[0][0][step]) and torch.equal(grads_x[step], results[0][1][step])
        assert_close_rel(results[0][0][step], want, torch.float64, f"loss, step {step}")
        assert_close_rel(results[0][1][step], want_gx, torch.float64, f"grad input, step {step}")
        assert_close_rel(torch.cat([r[2][step] for r in results]), want_gw, torch.float64, f"grad weight, step {step}")
    for stats in (r[3] for r in results):
        for got, buffer in zip(stats, buffers):
            torch.testing.assert_close(got, getattr(single, buffer), rtol=1e-12, atol=0)
    if kind == "curricular":
        assert single.t.item() != 0.0


@pytest.mark.parametrize("kind", list(STEP_MODULES))
def test_sharded_adaptive_margin_modules_sample_classes(world, kind):
    """sample_rate < 1 (PartialFC) with per-row margins or hard negatives: the tensors travel beside the sampled
    classes."""
    D, C = 8, 40
    x, w, t = make_case(10, C, D, torch.float64)
    results = world.run(_adaptive_module_steps, kind, D, C, x * 3, t, w, 0.5)
    for losses, grads_x, _, _ in results:
        assert all(torch.isfinite(v).all() for v in losses + grads_x)
        assert torch.equal(losses[0], results[0][0][0]) and torch.equal(grads_x[1], results[0][1][1])


def _adaface_step_failing_on_one_rank(rank, world_size):
    """A step that raises on rank 1 alone (its targets are short) must leave AdaFace's statistics untouched on every
    rank (a review saw rank 0 store its update and the ranks' margins differ from then on); then a good step runs."""
    torch.manual_seed(0)
    module = mkd.ShardedAdaFaceLoss(4, 6, t_alpha=0.5, dtype=torch.float64)
    x, t = 3 * torch.ones(5, 4, dtype=torch.float64), torch.arange(5) % 6
    with pytest.raises(ValueError):
        module(x, t[:4] if rank == 1 else t)
    untouched = (module.batch_mean.item(), module.batch_std.item()) == (20.0, 100.0)
    module(x, t)
    return untouched, module.batch_mean.item()


def _curricular_step_failing_on_one_rank(rank, world_size):
    """A step that raises on rank 1 alone (its targets are short): no rank may be left waiting in t's all-reduce, and
    t stays untouched on every rank; then a good step moves it alike everywhere."""
    torch.manual_seed(0)
    module = mkd.ShardedCurricularFaceLoss(4, 6, momentum=0.5, dtype=torch.float64)
    x, t = 3 * torch.ones(5, 4, dtype=torch.float64), torch.arange(5) % 6
    with pytest.raises(ValueError):
        module(x, t[:4] if rank == 1 else t)
    untouched = module.t.item() == 0.0
    module(x, t)
    return untouched, module.t.item()


def _step_collectives_in_mixed_modes(rank, world_size, name):
    """Rank 0 in training mode, the others in eval mode: every rank raises the mode error (CurricularFace's t
    all-reduce, ElasticFace's draws' broadcast would otherwise meet another collective)."""
    module = getattr(mkd, name)(4, 6, dtype=torch.float64)
    module.train(rank == 0)
    with pytest.raises(ValueError, match=r"every rank must be in the same mode \(train or eval\)"):
        module(3 * torch.ones(5, 4, dtype=torch.float64), torch.arange(5) % 6)
    return getattr(module, "t", torch.zeros(1)).item() == 0.0


@pytest.mark.parametrize("name", ["ShardedCurricularFaceLoss", "ShardedElasticArcFaceLoss"])
def test_step_collectives_in_mixed_modes_raise_everywhere(world, name):
    assert world.run(_step_collectives_in_mixed_modes, name) == [True] * world.size


def _elastic_under_checkpointing(rank, world_size, x, t, weight):
    """(loss, dL/dx, dL/dweight_shard) of one training step of ShardedElasticArcFaceLoss, plain and under activation
    checkpointing, from the same RNG state (each rank its own seed)."""
    from torch.utils.checkpoint import checkpoint
    module = mkd.ShardedElasticArcFaceLoss(x.shape[1], weight.shape[0], scale=16.0, std=0.2, dtype=torch.float64)
    start, stop = mkd.shard_range(weight.shape[0], rank, world_size)
    with torch.no_grad():
        module.weight.copy_(weight[start:stop])
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(100 + rank)
        xs = x.clone().requires_grad_()
        loss = checkpoint(module, xs, t, use_reentrant=False) if checkpointed else module(xs, t)
        results.append((loss.detach(),) + torch.autograd.grad(loss, (xs, module.weight)))
    return results


def test_sharded_elasticface_under_activation_checkpointing(world):
    """The recompute draws the margins again from the restored RNG state and broadcasts rank 0's again: the same
    loss and gradients as the plain step, on every rank."""
    x, w, t = make_case(11, 23, 6, torch.float64)
    for plain, checkpointed in world.run(_elastic_under_checkpointing, 3 * x, t, w):
        for a, b in zip(plain, checkpointed):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_failed_step_leaves_the_curricular_t_alone(world):
    results = world.run(_curricular_step_failing_on_one_rank)
    assert all(untouched for untouched, _ in results)
    assert len({t for _, t in results}) == 1 and results[0][1] != 0.0


def _sharded_hard_negatives(rank, world_size, x, w, t, hard, threshold=None, differ=False):
    """(loss, dL/dinput, dL/dweight_shard) of this rank with hard negatives (above `threshold` if given); differ: rank 1
    passes other coefficients (another threshold, if given), and every rank must raise (True)."""
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    x, shard = x.clone().requires_grad_(), w[start:stop].clone().requires_grad_()
    kwargs = dict(class_start=start, num_classes=w.shape[0], scale=16.0, m3=0.1, label_smoothing=0.1)
    if differ:
        if threshold is None:
            hard = hard + 0.01 * rank
        else:
            threshold = threshold + 0.01 * rank
        with pytest.raises(ValueError, match="must be the same on every rank"):
            mkd.sharded_margin_cross_entropy(x, shard, t, hard_negatives=hard, hard_negative_threshold=threshold,
                                             **kwargs)
        return True
    loss = mkd.sharded_margin_cross_entropy(x, shard, t, hard_negatives=hard, hard_negative_threshold=threshold,
                                            **kwargs)
    return (loss.detach(),) + torch.autograd.grad(loss, (x, shard))


@pytest.mark.parametrize("threshold", [None, 0.2], ids=["target-threshold", "fixed-threshold"])
def test_sharded_hard_negatives_match_the_single_process_loss(world, threshold):
    """Each row's threshold T comes from the rank that holds its target (the others hold 0), or is the fixed one (no
    all-reduce): loss and gradients equal the single-process ones; coefficients or thresholds that differ across
    ranks are refused on every rank."""
    x, w, t = make_case(13, 29, 7, torch.float64, ignore=(0, 5))
    x[1::2] = 3 * w[t[1::2].clamp_min(0)]
    hard = torch.tensor([1.0, 0.3, 0.05], dtype=torch.float64)
    results = world.run(_sharded_hard_negatives, x, w, t, hard, threshold)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = mk.margin_cross_entropy(xs, ws, t, scale=16.0, m3=0.1, label_smoothing=0.1, hard_negatives=hard,
                                   hard_negative_threshold=threshold)
    want_gx, want_gw = torch.autograd.grad(want, (xs, ws))
    for loss, gx, _ in results:
        assert torch.equal(loss, results[0][0]) and torch.equal(gx, results[0][1])
    assert_close_rel(results[0][0], want, torch.float64, "loss")
    assert_close_rel(results[0][1], want_gx, torch.float64, "grad input")
    assert_close_rel(torch.cat([r[2] for r in results]), want_gw, torch.float64, "grad weight")
    assert world.run(_sharded_hard_negatives, x, w, t, hard, threshold, True) == [True] * world.size


def test_a_failed_step_leaves_the_adaface_statistics_alone(world):
    results = world.run(_adaface_step_failing_on_one_rank)
    assert all(untouched for untouched, _ in results)
    assert len({mean for _, mean in results}) == 1 and results[0][1] == 0.5 * 6.0 + 10.0


def _meta_initialised_adaface(rank, world_size):
    module = mkd.ShardedAdaFaceLoss(4, 6, device="meta").to_empty(device="cpu")
    module.reset_parameters()
    return module.batch_mean.item(), module.batch_std.item()


def test_meta_initialised_adaface_gets_its_statistics(world):
    assert world.run(_meta_initialised_adaface) == [(20.0, 100.0)] * world.size


def _sharded_topk(rank, world_size, x, w, bias, k, kwargs, differ=None):
    """This rank's sharded_linear_topk; differ "k" / "bias": rank 1 asks for another k / passes no bias, and every
    rank must raise (True)."""
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    bias_shard = None if bias is None or (differ == "bias" and rank == 1) else bias[start:stop]
    call = functools.partial(mkd.sharded_linear_topk, x, w[start:stop], bias_shard=bias_shard, class_start=start,
                             num_classes=w.shape[0], **kwargs)
    if differ is not None:
        with pytest.raises(ValueError, match="every rank must pass the same options"):
            call(k + (differ == "k" and rank == 1))
        return True
    return call(k)


@pytest.mark.parametrize("kwargs", [dict(return_lse=True), dict(normalize=True),
                                    dict(softcap=3.0, logit_scale=0.7, return_lse=True)],
                         ids=["lse", "normalize", "bias-scale-softcap"])
def test_sharded_linear_topk_matches_single_process(world, kwargs):
    """Each rank's top-k over its classes, merged: linear_topk's over the whole head, identical on every rank."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 7, 12, dtype=torch.float64), torch.randn(61, 12, dtype=torch.float64)
    bias = None if kwargs.get("normalize") else torch.randn(61, dtype=torch.float64)
    results = world.run(_sharded_topk, x, w, bias, 9, kwargs)
    want = mk.linear_topk(x, w, 9, bias, **kwargs)
    for got in results:
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(got[1], want[1])
        if kwargs.get("return_lse"):
            torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 12)], ids=["no-rows", "empty-sequences"])
def test_sharded_linear_topk_of_no_rows(world, shape):
    """An empty batch gives empty results as linear_topk's (reshape(N, -1) of 0 rows raised on every rank: a fuzzing
    review)."""
    x, w = torch.randn(*shape), torch.randn(20, 12)
    want = mk.linear_topk(x, w, 3, return_lse=True)
    for got in world.run(_sharded_topk, x, w, None, 3, dict(return_lse=True)):
        assert [t.shape for t in got] == [t.shape for t in want], (got, want)


def test_sharded_linear_topk_checks_its_arguments_on_every_rank(world):
    x, w = torch.randn(5, 4), torch.randn(20, 4)
    assert world.run(_sharded_topk, x, w, None, 2, {}, "k") == [True] * world.size
    # a bias on some ranks only: the merged logits would mix two heads
    assert world.run(_sharded_topk, x, w, torch.randn(20), 2, {}, "bias") == [True] * world.size
    # k above the smallest shard's classes: every rank raises the same error
    results = world.run(_sharded_topk_too_large, x, w)
    assert results == [True] * world.size


def _sharded_topk_too_large(rank, world_size, x, w):
    start, stop = mkd.shard_range(w.shape[0], rank, world_size)
    with pytest.raises(ValueError, match=r"k must lie in \[1, \d+\] \(the smallest shard's classes\)"):
        mkd.sharded_linear_topk(x, w[start:stop], w.shape[0] // world_size + 1, class_start=start,
                                num_classes=w.shape[0])
    return True


def _sharded_proxy_anchor(rank, world_size, x, w, t, kwargs, backend=None, differ=None):
    """(loss, dL/dinput, dL/dproxies_shard) of this rank's sharded_proxy_anchor_loss; differ "alpha": rank 1 asks for
    another α and every rank must raise (True)."""
    with _backend(backend):
        start, x, shard = _rank_rows(x, w, rank, world_size)
        call = functools.partial(mkd.sharded_proxy_anchor_loss, x, shard, t, class_start=start, num_classes=w.shape[0])
        if differ == "alpha":
            with pytest.raises(ValueError, match="every rank must pass the same options"):
                call(alpha=32.0 + (rank == 1), **kwargs)
            return True
        loss = call(**kwargs)
        gx, gw = torch.autograd.grad(loss * 0.7, (x, shard))
        return loss.detach(), gx, gw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("labels", ["spread", "one-rank", "ignored"])
def test_sharded_proxy_anchor_matches_single_process(world, dtype, labels):
    """Each rank's proxies, the three sums all-reduced: proxy_anchor_loss over all proxies, identical on every rank;
    rows whose class is another rank's are negatives of every proxy here. Labels spread over all shards, all on the
    first rank's proxies, or with ignored rows."""
    torch.manual_seed(1)
    x, w = torch.randn(29, 10, dtype=torch.float64).to(dtype), torch.randn(41, 10, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 41 if labels != "one-rank" else 41 // world.size, (29,))
    if labels == "ignored":
        t[[0, 5, 6]] = -100
    kwargs = dict(margin=0.2, alpha=16.0)
    results = world.run(_sharded_proxy_anchor, x, w, t, kwargs)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = mk.proxy_anchor_loss(x1, w1, t, **kwargs)
    want_gx, want_gw = torch.autograd.grad(want * 0.7, (x1, w1))
    # fp32 arithmetic for fp32/bf16 (the loss fp32 either way); bf16 gradients rounded once when stored
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    grad_tol = torch.finfo(dtype).eps if dtype == torch.bfloat16 else tol
    loss, gx, _ = results[0]
    for r, (loss_r, gx_r, _) in enumerate(results):
        assert torch.equal(loss_r, loss) and torch.equal(gx_r, gx), f"rank {r} differs from rank 0"
    torch.testing.assert_close(loss, want, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), want_gx.double(), rtol=0, atol=grad_tol * want_gx.abs().max().item())
    torch.testing.assert_close(torch.cat([gw for _, _, gw in results]).double(), want_gw.double(), rtol=0,
                               atol=grad_tol * want_gw.abs().max().item())


def test_sharded_proxy_anchor_checks_its_arguments_on_every_rank(world):
    x, w, t = torch.randn(5, 4), torch.randn(20, 4), torch.randint(0, 20, (5,))
    assert world.run(_sharded_proxy_anchor, x, w, t, {}, None, "alpha") == [True] * world.size
    assert world.run(_sharded_proxy_anchor_bad_target) == [True] * world.size


def _sharded_proxy_anchor_bad_target(rank, world_size):
    start, stop = mkd.shard_range(20, rank, world_size)
    with pytest.raises(ValueError, match="target"):
        mkd.sharded_proxy_anchor_loss(torch.randn(5, 4), torch.randn(stop - start, 4), torch.tensor([0, 1, 2, 3, 20]),
                                      class_start=start, num_classes=20)
    return True


# ---- KTO's reference point over data-parallel ranks ---------------------------------------------------------

def _kto_kl_on_rank(rank, world_size, diffs):
    """This rank's share of the mismatched pairs (ranks hold different counts), its reference point over the group."""
    mine = diffs[rank]
    return mk.kto_kl_estimate(mine, torch.zeros_like(mine), process_group=dist.group.WORLD)


def test_kto_kl_estimate_is_the_mean_over_every_rank_before_the_clamp(world):
    """TRL gathers every rank's mean, averages them (unweighted) and clamps: not a count-weighted mean, and not a
    mean of per-rank clamped means. The ranks here hold different counts and means of mixed signs, so that the
    three differ after the clamp."""
    diffs = [torch.tensor([3.0]), torch.tensor([-1.0, -1.0, -1.0, -1.0]), torch.tensor([0.5, 0.5])][:world.size]
    trl = torch.stack([d.mean() for d in diffs]).mean().clamp(min=0)
    weighted = torch.cat(diffs).mean().clamp(min=0)
    per_rank_clamped = torch.stack([d.mean().clamp(min=0) for d in diffs]).mean()
    assert not (torch.isclose(trl, weighted) or torch.isclose(trl, per_rank_clamped))  # the case tells them apart
    for kl in world.run(_kto_kl_on_rank, diffs):
        assert torch.allclose(kl, trl, atol=1e-7)


# ---- in-batch contrastive losses over data-parallel ranks (open_clip's local loss with gathered features) ----------

def _contrastive_on_rank(rank, world_size, q_all, k_all, loss_name, kwargs, backend=None):
    """(this rank's loss, dL/d(its queries), dL/d(its keys), dL/d(its learned scalars)) with the features of every
    rank gathered inside the loss; the learned scale (and SigLIP's bias) are this rank's own copies."""
    if backend is not None:
        os.environ["MARGINKERN_BACKEND"] = backend
    try:
        B, M = q_all.shape[0] // world_size, k_all.shape[0] // world_size
        q = q_all[rank * B:(rank + 1) * B].clone().requires_grad_()
        k = k_all[rank * M:(rank + 1) * M].clone().requires_grad_()
        learned = {name: torch.tensor(value, dtype=q.dtype, requires_grad=True) for name, value in kwargs.items()
                   if name in ("scale", "bias")}
        other = {name: value for name, value in kwargs.items() if name not in learned}
        loss = getattr(mk, loss_name)(q, k, **learned, **other, group=dist.group.WORLD)
        grads = torch.autograd.grad(loss, [q, k, *learned.values()])
        return loss.detach(), grads
    finally:
        os.environ.pop("MARGINKERN_BACKEND", None)


def _contrastive_single_process(q_all, k_all, W, loss_name, kwargs):
    """Every rank's (loss, grads) from the materialised float64 definitions of tests/test_contrastive.py: rank r's
    query i is global row r·B + i, its positive global key r·M + i; the gradients of the queries and keys are those of
    the sum of the ranks' losses (what the gather's backward sums), the scalars' those of the rank's own loss."""
    from tests.test_contrastive import info_nce_oracle, siglip_oracle
    B, M = q_all.shape[0] // W, k_all.shape[0] // W
    q, k = q_all.clone().requires_grad_(), k_all.clone().requires_grad_()
    out, losses, scalars = [], [], []
    for r in range(W):
        learned = {name: torch.tensor(kwargs[name], dtype=torch.float64, requires_grad=True)
                   for name in ("scale", "bias") if name in kwargs}
        rows = q[r * B:(r + 1) * B]
        positive = torch.arange(r * M, r * M + B)
        normalize = kwargs.get("normalize", True)
        if loss_name == "siglip_loss":
            loss = siglip_oracle(rows, k, learned["scale"], learned["bias"], positive=positive,
                                 normalize=normalize).mean()
        else:
            scale = learned.get("scale", 20.0)
            loss = info_nce_oracle(rows, k, scale, positive=positive, margin=kwargs.get("margin", 0.0),
                                   normalize=normalize)
            if kwargs.get("symmetric"):
                back = info_nce_oracle(k[r * M:r * M + B], q, scale, positive=torch.arange(r * B, (r + 1) * B),
                                       margin=kwargs.get("margin", 0.0), normalize=normalize)
                loss = (loss + back) / 2
            loss = loss.mean()
        losses.append(loss)
        scalars.append(torch.autograd.grad(loss, list(learned.values()), retain_graph=True) if learned else ())
    gq, gk = torch.autograd.grad(torch.stack(losses).sum(), (q, k))
    for r in range(W):
        out.append((losses[r].detach(), (gq[r * B:(r + 1) * B], gk[r * M:(r + 1) * M], *scalars[r])))
    return out


def assert_each_rank_matches(got, want):
    """Each rank's (loss, gradients) as the single-process definition's, in float64."""
    for (loss, grads), (want_loss, want_grads) in zip(got, want):
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
        assert len(grads) == len(want_grads)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_name,kwargs", [
    ("info_nce_loss", dict(symmetric=True)),
    ("info_nce_loss", dict(scale=14.0, symmetric=True)),
    ("info_nce_loss", dict(margin=0.2)),
    ("siglip_loss", dict(scale=10.0, bias=-10.0)),
], ids=["clip", "clip-learned-scale", "am-softmax", "siglip"])
@pytest.mark.parametrize("hard_negatives", [0, 3], ids=["square", "hard-negatives"])
def test_contrastive_losses_gather_every_ranks_features(world, loss_name, kwargs, hard_negatives):
    """Each rank's loss and gradients match the single-process definition over the gathered batch: its queries
    against every rank's keys (the others' all negatives), the gradient of its keys summed over every rank's loss."""
    W, B, D = world.size, 5, 8
    M = B + hard_negatives
    torch.manual_seed(W + hard_negatives)
    q_all, k_all = torch.randn(W * B, D, dtype=torch.float64), torch.randn(W * M, D, dtype=torch.float64)
    got = world.run(_contrastive_on_rank, q_all, k_all, loss_name, kwargs)
    want = _contrastive_single_process(q_all, k_all, W, loss_name, kwargs)
    assert_each_rank_matches(got, want)


def _open_clip_on_rank(rank, world_size, q_all, k_all, loss_name, kwargs):
    """_contrastive_on_rank's outputs from marginkern.open_clip's drop-in for loss_name (features are unit rows)."""
    from marginkern.open_clip import ClipLoss, SigLipLoss
    B = q_all.shape[0] // world_size
    q = q_all[rank * B:(rank + 1) * B].clone().requires_grad_()
    k = k_all[rank * B:(rank + 1) * B].clone().requires_grad_()
    learned = [torch.tensor(kwargs[name], dtype=q.dtype, requires_grad=True) for name in ("scale", "bias")
               if name in kwargs]
    if loss_name == "siglip_loss":
        module = SigLipLoss(rank=rank, world_size=world_size)
    else:
        module = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    module = copy.deepcopy(module)  # a copy shares the default group (deepcopy of a ProcessGroup raised)
    assert module.group is dist.group.WORLD
    loss = module(q, k, *learned)
    with pytest.raises(NotImplementedError, match="local_loss=True, gather_with_grad=False"):
        ClipLoss(local_loss=True, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match="does not match"):
        SigLipLoss(rank=(rank + 1) % world_size, world_size=world_size)
    return loss.detach(), torch.autograd.grad(loss, [q, k, *learned])


def _open_clip_gathered(image, text, local_loss, gather_with_grad, rank, world_size):
    """open_clip.loss.gather_features (torch.distributed, no Horovod), as open_clip 3.x writes it."""
    import torch.distributed.nn  # noqa: F401  (open_clip imports it: the all_gather with a backward)
    if gather_with_grad:
        return (torch.cat(torch.distributed.nn.all_gather(image), dim=0),
                torch.cat(torch.distributed.nn.all_gather(text), dim=0))
    images = [torch.zeros_like(image) for _ in range(world_size)]
    texts = [torch.zeros_like(text) for _ in range(world_size)]
    dist.all_gather(images, image)
    dist.all_gather(texts, text)
    if not local_loss:  # the rank's own slice with its gradient
        images[rank], texts[rank] = image, text
    return torch.cat(images, dim=0), torch.cat(texts, dim=0)


def _open_clip_loss(image, text, logit_scale, local_loss, gather_with_grad, rank, world_size):
    """open_clip.loss.ClipLoss.forward with world_size > 1."""
    all_image, all_text = _open_clip_gathered(image, text, local_loss, gather_with_grad, rank, world_size)
    if local_loss:
        logits_per_image, logits_per_text = logit_scale * image @ all_text.T, logit_scale * text @ all_image.T
        labels = torch.arange(image.shape[0]) + image.shape[0] * rank
    else:
        logits_per_image = logit_scale * all_image @ all_text.T
        logits_per_text, labels = logits_per_image.T, torch.arange(all_image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _clip_loss_against_open_clip(rank, world_size, q_all, k_all, local_loss, gather_with_grad):
    """(loss, grads of the features, grad of logit_scale) of marginkern's ClipLoss and of open_clip's arithmetic."""
    from marginkern.open_clip import ClipLoss
    B = q_all.shape[0] // world_size
    out = []
    for fn in (ClipLoss(local_loss, gather_with_grad, rank=rank, world_size=world_size),
               functools.partial(_open_clip_loss, local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                 world_size=world_size)):
        q = q_all[rank * B:(rank + 1) * B].clone().requires_grad_()
        k = k_all[rank * B:(rank + 1) * B].clone().requires_grad_()
        scale = torch.tensor(14.0, dtype=q.dtype, requires_grad=True)
        loss = fn(q, k, scale)
        out.append((loss.detach(), torch.autograd.grad(loss, [q, k, scale])))
    return out


@pytest.mark.parametrize("local_loss,gather_with_grad", [(True, True), (False, True), (False, False)],
                         ids=["local-gathered-with-grad", "global-gathered-with-grad", "global (open_clip's default)"])
def test_clip_loss_gives_open_clips_losses_and_gradients(world, local_loss, gather_with_grad):
    """marginkern.open_clip.ClipLoss against open_clip's own arithmetic (its gather_features and ClipLoss.forward) on
    every rank: the loss value and the features' gradients as open_clip's, the learned scale's gradient equal after
    DDP's averaging over the ranks (with local_loss=False open_clip's is the global loss's on every rank)."""
    W, B, D = world.size, 4, 8
    torch.manual_seed(W)
    q_all = torch.nn.functional.normalize(torch.randn(W * B, D, dtype=torch.float64), dim=1)
    k_all = torch.nn.functional.normalize(torch.randn(W * B, D, dtype=torch.float64), dim=1)
    results = world.run(_clip_loss_against_open_clip, q_all, k_all, local_loss, gather_with_grad)
    for (loss, grads), (want_loss, want_grads) in results:
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        for g, w in zip(grads[:2], want_grads[:2]):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    mean_scale_grad = torch.stack([grads[2] for (_, grads), _ in results]).mean()
    want_scale_grad = torch.stack([grads[2] for _, (_, grads) in results]).mean()
    torch.testing.assert_close(mean_scale_grad, want_scale_grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss_name,kwargs", [("info_nce_loss", dict(scale=14.0, symmetric=True, normalize=False)),
                                              ("siglip_loss", dict(scale=10.0, bias=-10.0, normalize=False))],
                         ids=["clip", "siglip"])
def test_open_clip_drop_ins_gather_every_ranks_features(world, loss_name, kwargs):
    """marginkern.open_clip's ClipLoss(local_loss=True, gather_with_grad=True) and SigLipLoss over the default group:
    each rank's loss and gradients as the single-process definition over the gathered batch."""
    W, B, D = world.size, 5, 8
    torch.manual_seed(W)
    q_all = torch.nn.functional.normalize(torch.randn(W * B, D, dtype=torch.float64), dim=1)
    k_all = torch.nn.functional.normalize(torch.randn(W * B, D, dtype=torch.float64), dim=1)
    got = world.run(_open_clip_on_rank, q_all, k_all, loss_name, kwargs)
    want = _contrastive_single_process(q_all, k_all, W, loss_name, kwargs)
    assert_each_rank_matches(got, want)


def _contrastive_with_unequal_batches(rank, world_size):
    q, k = torch.randn(3 + rank, 4), torch.randn(3 + rank, 4)
    with pytest.raises(ValueError, match="same shape"):
        mk.siglip_loss(q, k, group=dist.group.WORLD)
    return True


def test_contrastive_losses_refuse_unequal_batches_on_every_rank(world):
    assert all(world.run(_contrastive_with_unequal_batches))


def _supcon_on_rank(rank, world_size, f_all, labels_all, kwargs):
    bsz = f_all.shape[0] // world_size
    f = f_all[rank * bsz:(rank + 1) * bsz].clone().requires_grad_()
    labels = None if labels_all is None else labels_all[rank * bsz:(rank + 1) * bsz]
    loss = mk.supcon_loss(f, labels, **kwargs, group=dist.group.WORLD)
    return loss.detach(), torch.autograd.grad(loss, f)[0]


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("labelled", [True, False], ids=["supcon", "simclr"])
def test_supcon_gathers_every_ranks_views(world, labelled, contrast_mode):
    """Each rank's anchors against every rank's rows: the rank's loss is the mean of the single-process rows of its
    samples, and the gradient of its features that of the sum of the ranks' losses (materialised in float64)."""
    from tests.test_contrastive import official_supcon
    W, bsz = world.size, 4
    torch.manual_seed(W)
    f_all = torch.randn(W * bsz, 2, 6, dtype=torch.float64)
    labels_all = torch.arange(W * bsz) % 3 if labelled else None
    got = world.run(_supcon_on_rank, f_all, labels_all, dict(temperature=0.3, contrast_mode=contrast_mode))
    ref = f_all.clone().requires_grad_()
    rows = official_supcon(F.normalize(ref, dim=2), labels_all if labelled else None, 0.3,
                           contrast_mode=contrast_mode)  # (anchor views, W·bsz)
    per_rank = [rows[:, r * bsz:(r + 1) * bsz].mean() for r in range(W)]
    want_grad = torch.autograd.grad(torch.stack(per_rank).sum(), ref)[0]
    for r, (loss, grad) in enumerate(got):
        torch.testing.assert_close(loss, per_rank[r].detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, want_grad[r * bsz:(r + 1) * bsz], rtol=1e-9, atol=1e-12)
