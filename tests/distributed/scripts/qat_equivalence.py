"""Run under ``mpiexec -n W``: DigitsCNN (Conv+BN, folded into QATConvBn2d under QAT) trained
data-parallel on W ranks for STEPS steps, against one process on the global batches. Every
rank also computes the one-process reference itself (no group installed).

QAT training is chaotic at the last bit: a one-ulp change of the initial weights of a single
process moves its parameters by about 1e-2 after 20 steps, because a weight or activation
that lands on a rounding boundary takes the other integer and every later step follows. The
data-parallel gradient is summed in another order than one process's (rank by rank), so a
free-running comparison after 20 QAT steps measures that chaos, not the implementation.
The script therefore checks:

- QAT, step by step: before each step the reference takes the distributed model's state and
  optimizer state; after the step both must agree (parameters and BatchNorm statistics within
  1e-5 relative, observer ranges exactly); all 20 steps;
- float training (no rounding to integers), free-running for 20 steps: within 1e-5;
- on every step of the QAT run, the full state (parameters, buffers, observer ranges,
  qparams) has the same bytes on every rank;
- the converted int8 model of the distributed QAT run against its QAT model: exact parity.

Rank 0 prints one JSON object with the figures; the free-running QAT difference is reported
next to the one-ulp sensitivity of a single process, for the record.
"""

import hashlib
import json
import sys

import numpy as np

from qatcore import nn
from qatcore.data import DataLoader, ShardedLoader, load_digits
from qatcore.distributed import DataParallel, MPIGroup, failing_fast
from qatcore.models import DigitsCNN
from qatcore.optim import SGD
from qatcore.process_group import use_group
from qatcore.quantization.qat import QATPreparer, parity_report

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
BATCH = 48


def state(model):
    return {name: np.array(value) for name, value in model.state_dict().items()}


def observer_ranges(model):
    return {name: np.concatenate([np.ravel(module.min_val.data), np.ravel(module.max_val.data)])
            for name, module in model.named_modules() if hasattr(module, "min_val") and hasattr(module, "max_val")}


def rel(a, b):
    """The largest difference relative to the tensor's largest magnitude (an elementwise ratio
    would divide by the values near zero every bias and running mean has)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if a.size else 0.0


def compare(ours, theirs, names):
    return max((rel(ours[k], theirs[k]) for k in names), default=0.0)


def make(qat, seed, scale=1.0):
    model = DigitsCNN(rng=np.random.default_rng(seed))
    for p in model.parameters():
        p.data *= np.float32(scale)
    return QATPreparer().prepare_for_qat(model) if qat else model


def optimizer_of(model):
    return SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def step(model, optimizer, xb, yb):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    optimizer.step()


def global_batches(x, y):
    loader = DataLoader(x, y, BATCH, shuffle=True, rng=np.random.default_rng(1))
    while True:
        yield from loader


def shares(x, y, group):
    loader = ShardedLoader(DataLoader(x, y, BATCH, shuffle=True, rng=np.random.default_rng(1)),
                           group.rank, group.world_size)
    while True:
        yield from loader


def free_running(qat, x, y, scale=1.0):
    with use_group(None):
        model = make(qat, 0, scale)
        optimizer, batches = optimizer_of(model), global_batches(x, y)
        for _ in range(STEPS):
            step(model, optimizer, *next(batches))
    return state(model)


def main(group):
    x, y, x_test, _ = load_digits()
    seed = 0 if group.rank == 0 else 50 + group.rank  # rank 0's initial weights must win

    # float, free-running
    model = make(False, seed)
    with use_group(group):
        wrapped = DataParallel(model)
        optimizer, batches = optimizer_of(wrapped), shares(x, y, group)
        for _ in range(STEPS):
            step(wrapped, optimizer, *next(batches))
    ours, theirs = state(model), free_running(False, x, y)
    float_bn = compare(ours, theirs, [k for k in ours if "running_" in k])
    float_params = compare(ours, theirs, [n for n, _ in model.named_parameters()])

    # QAT, step by step against a reference that starts each step from our state
    model = make(True, seed)
    with use_group(None):
        reference = make(True, 0)
        reference_optimizer = optimizer_of(reference)
    reference_batches = global_batches(x, y)
    with use_group(group):
        wrapped = DataParallel(model)
        optimizer, batches = optimizer_of(wrapped), shares(x, y, group)
        identical, bn, params, ranges_exact = [], [], [], []
        names = [n for n, _ in model.named_parameters()]
        for _ in range(STEPS):
            with use_group(None):
                reference.load_state_dict(model.state_dict())
                reference_optimizer.load_state_dict(optimizer.state_dict())
                step(reference, reference_optimizer, *next(reference_batches))
            step(wrapped, optimizer, *next(batches))
            ours, theirs = state(model), state(reference)
            digest = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for _, v in sorted(ours.items())))
            identical.append(len(set(group.allgather_object(digest.hexdigest()))) == 1)
            bn.append(compare(ours, theirs, [k for k in ours if "running_" in k]))
            params.append(compare(ours, theirs, names))
            mine, its = observer_ranges(model), observer_ranges(reference)
            ranges_exact.append(all(np.array_equal(mine[k], its[k]) for k in mine))
    free = free_running(True, x, y)
    one_ulp = free_running(True, x, y, scale=1 + 2 ** -23)
    model.eval()
    int8 = QATPreparer().convert_to_quantized(model)
    parity = parity_report(model, int8, x_test)
    if group.rank == 0:
        print(json.dumps({
            "world_size": group.world_size, "steps": STEPS,
            "float_max_rel_bn": float_bn, "float_max_rel_params": float_params,
            "qat_identical_every_step": all(identical), "qat_steps": len(identical),
            "qat_step_max_rel_bn": max(bn), "qat_step_max_rel_params": max(params),
            "qat_step_observer_ranges_exact": sum(ranges_exact),
            "qat_free_running_max_rel_params": compare(ours, free, names),
            "qat_one_ulp_sensitivity_max_rel_params": compare(one_ulp, free, names),
            "parity_exact": float(parity.output.exact), "top1": parity.top1_agreement,
        }), flush=True)


if __name__ == "__main__":
    world = MPIGroup.world(timeout=60)
    with failing_fast(world):
        main(world)
