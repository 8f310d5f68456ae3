"""Run under ``mpiexec -n W``: QAT of DigitsCNN (Conv+BN folded into QATConvBn2d) for STEPS
steps, data-parallel on W ranks, against the same training in one process on the global
batches (every rank computes that reference too, with no group installed).

Rank 0 prints one JSON object:
  identical_every_step   all ranks' full state (parameters, buffers, observer ranges, qparams)
                         had the same bytes after every step
  input_qparams_exact    the input quantizer's (min, max) equalled the reference's after every step
  first_step_exact       after step 1 every observer range equalled the reference's
  max_rel_bn / max_rel_params   after STEPS steps, the largest relative difference of the
                         BatchNorm running statistics / parameters from the reference
  max_rel_observers      ... of every observer's range
  parity_exact, top1     the converted int8 model of the distributed run vs its QAT model
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


def batches(loader):
    while True:
        yield from loader


def state(model):
    return {name: np.array(value) for name, value in model.state_dict().items()}


def observer_ranges(model):
    return {name: np.concatenate([np.ravel(module.min_val.data), np.ravel(module.max_val.data)])
            for name, module in model.named_modules() if hasattr(module, "min_val") and hasattr(module, "max_val")}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if a.size else 0.0


def train(model, loader, on_step):
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    it = batches(loader)
    for step in range(STEPS):
        xb, yb = next(it)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        on_step(step)


def main(group):
    x, y, x_test, _ = load_digits()
    # the reference: one process, the global batches
    with use_group(None):
        reference = QATPreparer().prepare_for_qat(DigitsCNN(rng=np.random.default_rng(0)))
        reference_ranges = []
        train(reference, DataLoader(x, y, BATCH, shuffle=True, rng=np.random.default_rng(1)),
              lambda step: reference_ranges.append(observer_ranges(reference)))
    # data-parallel: rank 0's initial weights win (the others start elsewhere on purpose)
    seed = 0 if group.rank == 0 else 50 + group.rank
    model = QATPreparer().prepare_for_qat(DigitsCNN(rng=np.random.default_rng(seed)))
    with use_group(group):
        wrapped = DataParallel(model)
        loader = ShardedLoader(DataLoader(x, y, BATCH, shuffle=True, rng=np.random.default_rng(1)),
                               group.rank, group.world_size)
        identical, input_exact, first_exact = [], [], None

        def check(step):
            nonlocal first_exact
            arrays = sorted(state(model).items())
            digest = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for _, v in arrays))
            identical.append(len(set(group.allgather_object(digest.hexdigest()))) == 1)
            ranges = observer_ranges(model)
            first = sorted(ranges)[0]
            input_exact.append(bool(np.array_equal(ranges[first], reference_ranges[step][first])))
            if step == 0:
                first_exact = all(np.array_equal(ranges[k], reference_ranges[0][k]) for k in ranges)

        train(wrapped, loader, check)
    ours, theirs = state(model), state(reference)
    bn = [k for k in ours if "running_" in k]
    params = [name for name, _ in model.named_parameters()]
    ranges = observer_ranges(model)
    model.eval()
    int8 = QATPreparer().convert_to_quantized(model)
    parity = parity_report(model, int8, x_test)
    if group.rank == 0:
        print(json.dumps({
            "world_size": group.world_size, "steps": STEPS, "bn_buffers": len(bn),
            "identical_every_step": all(identical), "input_qparams_exact": all(input_exact),
            "first_step_exact": bool(first_exact),
            "max_rel_bn": max(rel(ours[k], theirs[k]) for k in bn),
            "max_rel_params": max(rel(ours[k], theirs[k]) for k in params),
            "max_rel_observers": max(rel(ranges[k], reference_ranges[-1][k]) for k in ranges),
            "parity_exact": float(parity.output.exact), "top1": parity.top1_agreement,
        }), flush=True)


if __name__ == "__main__":
    world = MPIGroup.world(timeout=60)
    with failing_fast(world):
        main(world)
