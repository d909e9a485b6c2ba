"""torch.distributed: lrcompile.rewrite -> DDP (graphs split by DDPOptimizer) or FSDP2 fully_shard (per layer
and at the root) -> torch.compile(backend="lrcompile"), 2 gloo processes on loopback. Each rank trains on half
of every batch; the averaged losses and the trained factors must equal the one-process run, and the factors
must be identical on both ranks. The backend refuses to make new factors under either wrapper.

The two-process runs share ONE spawn (module fixture, ~25 s: process start and compiles dominate) and are marked
slow; the refusal runs in this process under a one-process gloo group."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import lowered
from test_attention import ManualAttn
from torch import nn

import lrcompile
from lrcompile.backend import lrcompile_backend
from lrcompile.errors import LrcompileError
from lrcompile.families import is_owned
from lrcompile.families.base import owned_parameters
from lrcompile.lifecycle.distributed import ADVICE

POLICY = {
    "defaults": {"min_features": 0},
    "rules": [
        {"match": "attn", "kind": "attention", "method": "shared_kv", "rank": 6},
        {"match": "*", "method": "lowrank", "rank": 8},
    ],
}
OPTIONS = {"inductor": False}  # one dict: one backend session for every graph of a run
STEPS, LR = 3, 0.1
BUCKET = 4096  # bytes: DDPOptimizer cuts the graph at every bucket of this size


class Net(nn.Module):
    """Attention (K/V shared basis: AttnFeed), nn.Linear sites (swapped for LowRank) and, with `functional`, a
    root functional site (factors attached: attach.Feed)."""

    def __init__(self, functional=True):
        super().__init__()
        self.attn = ManualAttn(mask="causal", p=0.0)
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
        self.w = nn.Parameter(torch.randn(32, 32) / 32**0.5) if functional else None

    def forward(self, x):
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return F.linear(x, self.w) if self.w is not None else x


def make(functional=True) -> Net:
    torch.manual_seed(0)
    m = Net(functional)
    lrcompile.rewrite(m, POLICY, (torch.randn(2, 5, 32),), progress=False)
    return m


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, 32, generator=g), torch.randn(4, 6, 32, generator=g)) for _ in range(STEPS)]


def train(model: nn.Module, params, data) -> list[float]:
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def factors(m: nn.Module, names: set) -> dict:
    """lrcompile's parameters `names`, whole: an FSDP2 DTensor is gathered from both ranks."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in m.named_parameters()
        if n in names
    }


def owned(m: nn.Module) -> set:
    """lrcompile's parameters by their own mark (what a freshly rewritten model carries)."""
    return {n for n, p in m.named_parameters() if is_owned(p)}


def owned_after_wrapping(m: nn.Module) -> set:
    """The same after DDP / FSDP2 wrapped the model (FSDP2 replaces them by unmarked DTensors): the modules'
    names (structures.base.Owner.tensor_names) still know them."""
    return {n for n, _ in owned_parameters(m)}


class Counting:
    """The lrcompile backend, recording each graph it compiles and what its runner feeds."""

    def __init__(self):
        self.graphs, self.feeds = 0, []

    def __call__(self, gm, inputs):
        fn = lrcompile_backend(gm, inputs, options=OPTIONS)
        self.graphs += 1
        self.feeds += [type(f).__name__ for f in fn.feeds]
        return fn


REFITS = {"n": 0}


def count_refits() -> None:
    """Count factor refits in this process (a false one would overwrite trained factors with the dense weights'
    SVD). Construction refits too: read the count around training only."""
    from lrcompile.attention.factors import AttnFactors
    from lrcompile.families import Structure

    for cls in (*AttnFactors.__subclasses__(), Structure):
        real = cls.refit

        def refit(self, *a, _real=real, **k):
            REFITS["n"] += 1
            return _real(self, *a, **k)

        cls.refit = refit


def run_wrapped(mode: str, rank: int, mesh, functional=True) -> dict:
    torch._dynamo.reset()
    m = make(functional)
    names = owned(m)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDPOptimizer asserts its first bucket (torch's 1 MiB default) is no larger than the others: lower it
        # with the bucket cap so that this small model's graph is split.
        dist._DEFAULT_FIRST_BUCKET_BYTES = BUCKET
        wrapped = DDP(m, bucket_cap_mb=BUCKET / 2**20)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(m.attn, mesh=mesh)  # per layer: each unit is compiled as its own frame
        fully_shard(m.mlp, mesh=mesh)
        wrapped = fully_shard(m, mesh=mesh)
    backend = Counting()
    marks_after = owned(m)  # FSDP2: none survive on the DTensors
    owned_after = owned_after_wrapping(m)
    half = [(x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2]) for x, y in batches()]
    refits = REFITS["n"]
    losses = train(torch.compile(wrapped, backend=backend), [p for p in m.parameters() if p.requires_grad], half)
    return {
        "losses": losses,
        "factors": factors(m, owned_after),
        "graphs": backend.graphs,
        "feeds": backend.feeds,
        "refits": REFITS["n"] - refits,
        "owned_before": names,
        "owned_after": owned_after,
        "marks_after": marks_after,
    }


def refusal(mode: str, mesh) -> list[str]:
    """The lines of lrcompile's error when compiling a wrapped model whose factors the backend would have to
    make (Dynamo appends its own lines to the exception it passes on)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Net()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(m)
    else:
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(m, mesh=mesh)
    c = torch.compile(wrapped, backend="lrcompile", options={"policy": POLICY, "inductor": False})
    try:
        c(torch.randn(2, 5, 32))
    except Exception as e:  # Dynamo wraps the backend's error: find ours in the chain
        while e is not None and not isinstance(e, LrcompileError):
            e = getattr(e, "inner_exception", None) or e.__cause__
        return str(e).splitlines() if e is not None else ["no LrcompileError in the chain"]
    return ["no error"]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,))
        count_refits()
        result = {"ddp": run_wrapped("ddp", rank, mesh, functional=False), "fsdp2": run_wrapped("fsdp2", rank, mesh)}
        try:
            result["ddp-functional"] = run_wrapped("ddp", rank, mesh)
        except RuntimeError as e:  # DDP: parameters that received no gradient (see the xfail below)
            result["ddp-functional"] = {"error": str(e).splitlines()[0]}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group():
    """A one-process gloo group in this process: enough for the wrappers to be active."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def one_process(functional: bool) -> dict:
    """The same steps in one process, whole batches."""
    torch._dynamo.reset()
    m = make(functional)
    before = factors(m, owned(m))
    c = torch.compile(m, backend="lrcompile", options=OPTIONS)
    losses = train(c, [p for p in m.parameters() if p.requires_grad], batches())
    torch._dynamo.reset()
    return {"losses": losses, "factors": factors(m, set(before)), "before": before}


@pytest.fixture(scope="module")
def single():
    return {f: one_process(f) for f in (False, True)}


def check_reproduces(r0: dict, r1: dict, ref: dict) -> None:
    averaged = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert averaged == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert ref["losses"][-1] < ref["losses"][0]  # it trained
    names = set(ref["factors"])
    assert {"attn.lrcompile_kv.U", "attn.lrcompile_kv.V", "attn.q.U", "mlp.0.U"} <= names
    assert set(r0["factors"]) == set(r1["factors"]) == names
    for n in names:
        assert torch.equal(r0["factors"][n], r1["factors"][n]), n  # synchronised: bit-identical on both ranks
        torch.testing.assert_close(r0["factors"][n], ref["factors"][n], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ref["factors"][n], ref["before"][n]), n  # every factor was trained
    assert "AttnFeed" in r0["feeds"]  # the K/V basis was fed to the compiled graph


@pytest.mark.slow
def test_ddp_two_processes_reproduce_one(ranks, single):
    check_reproduces(ranks[0]["ddp"], ranks[1]["ddp"], single[False])


@pytest.mark.slow
def test_fsdp2_two_processes_reproduce_one(ranks, single):
    for r in ranks:  # fully_shard dropped every tensor mark; the module records still name each factor
        assert r["fsdp2"]["marks_after"] == set() and r["fsdp2"]["owned_after"] == r["fsdp2"]["owned_before"]
    check_reproduces(ranks[0]["fsdp2"], ranks[1]["fsdp2"], single[True])
    assert "lrcompile_w.U" in single[True]["factors"] and "Feed" in ranks[0]["fsdp2"]["feeds"]  # attach.Feed ran


@pytest.mark.slow
def test_ddp_functional_site_uses_its_attached_factors(ranks, single):
    """DDPOptimizer compiles its subgraphs with fake example inputs: the sites take the real parameters from
    the graphargs (sites._placeholder_tensor), find the attached factors, and rewrite froze the dense weight,
    so DDP sees every trainable parameter used."""
    r0, r1 = ranks[0]["ddp-functional"], ranks[1]["ddp-functional"]
    assert "error" not in r0, r0.get("error")
    check_reproduces(r0, r1, single[True])
    assert "Feed" in r0["feeds"]


@pytest.mark.slow
def test_ddp_optimizer_split_the_graph(ranks):
    assert ranks[0]["ddp"]["graphs"] > 1 and ranks[1]["ddp"]["graphs"] == ranks[0]["ddp"]["graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_no_factor_was_refit_while_training(mode, ranks):
    # FSDP2 all-gathers the dense weights and the factors before every forward: their versions move together
    assert ranks[0][mode]["refits"] == ranks[1][mode]["refits"] == 0


@pytest.mark.parametrize("mode,wrapper", [("ddp", "DistributedDataParallel"), ("fsdp2", "fully_shard")])
def test_backend_refuses_new_factors_under_a_wrapper(mode, wrapper, group):
    first = refusal(mode, group)[0]  # lrcompile's whole message is its first line
    assert first.startswith("lrcompile: ") and first.endswith(ADVICE), first
    assert f"cannot add new parameters under {wrapper}" in first


class Manual(nn.Module):
    """After `rewrite`, `manual` makes the forward also apply the installed factors functionally, outside their
    module: the sites of those calls are lrcompile's parameters, never sites for another rewrite."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.manual = False

    def forward(self, x):
        y = self.proj(x)
        return y + F.linear(F.linear(x, self.proj.V), self.proj.U) if self.manual else y


def test_fsdp2_sharding_keeps_ownership(group):
    """fully_shard swaps every parameter for an unmarked DTensor (and hands Dynamo unmarked unsharded ones):
    ownership survives through the modules' records, both for listing the factors and for the site finder —
    otherwise the functional uses of U and V below would be new sites, which the backend refuses under FSDP2."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = Manual()
    lrcompile.rewrite(
        m,
        {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "lowrank", "rank": 8}]},
        (torch.randn(2, 32),),
        progress=False,
    )
    m.manual = True
    before = owned(m)
    assert before == {"proj.U", "proj.V"}
    x = torch.randn(3, 32)
    with torch.no_grad():
        U, V, b = m.proj.U.double(), m.proj.V.double(), m.proj.bias.double()
        want = x.double() @ (U @ V).T + b + x.double() @ V.T @ U.T
    fully_shard(m, mesh=group)
    assert owned(m) == set()  # the tensor marks are gone
    assert owned_after_wrapping(m) == before
    torch._dynamo.reset()
    pol = {"defaults": {"min_features": 0}, "rules": [{"match": "*", "method": "lowrank", "rank": 4}]}  # < 8: lossy
    c = torch.compile(m, backend="lrcompile", options={"policy": pol, "inductor": False})
    with torch.no_grad():
        torch.testing.assert_close(c(x).double(), want, rtol=1e-5, atol=1e-5)
    assert set(lowered(m).values()) == {"installed"}  # the graph ran the installed factors, made none
