"""TinyGPT against the same model in PyTorch (``benchmarks/torch_tiny_gpt.py``), marked ``torch``:

- with copied weights, in float64, the logits agree to 1e-10 and, after one backward of the
  cross-entropy, every parameter's gradient to 1e-8 (untied and tied head);
- issue 19's "same recipe" line: each model from its own init (numpy's generator for ours,
  torch's for theirs), trained with the same recipe (AdamW, the same hyper-parameters) on the
  same batches (one DataLoader order fed to both), reaches a float validation loss within 5%
  of the other's, far below the loss of a uniform guess, ln(65) = 4.17. So the model and the
  training are right, not only the quantizers.

PyTorch runs with its default thread count (the machine's cores); only its speed depends on it.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import qatcore.nn.functional as F
from qatcore.autograd import no_grad
from qatcore.data import DataLoader, load_text, text_windows
from qatcore.models import TinyGPT
from qatcore.optim import AdamW

_TORCH_MODEL_FILE = Path(__file__).parents[2] / "benchmarks" / "torch_tiny_gpt.py"


def _torch_tiny_gpt():
    """The ``torch_tiny_gpt`` module (one definition of the PyTorch model, beside the benchmarks
    that time it); loaded by path, since the tests run in importlib mode."""
    spec = importlib.util.spec_from_file_location("torch_tiny_gpt", _TORCH_MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- copied weights, float64 -------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
def test_logits_and_gradients_equal_pytorch_with_copied_weights_in_float64(tie_weights):
    import torch

    reference = _torch_tiny_gpt()
    sizes = dict(vocabulary_size=65, block_size=16, n_layer=2, n_embd=32, n_head=4, tie_weights=tie_weights)
    ours = TinyGPT(**sizes, rng=np.random.default_rng(0))
    for parameter in {id(p): p for p in ours.parameters()}.values():
        parameter.data = parameter.data.astype(np.float64)
    theirs = reference.TorchTinyGPT(**sizes).double()
    reference.copy_weights_from_qatcore(theirs, ours)
    assert (theirs.head.weight is theirs.tok.weight) == tie_weights

    rng = np.random.default_rng(1)
    x = rng.integers(0, 65, size=(3, 16))
    y = rng.integers(0, 65, size=(3, 16))
    logits = ours(x)
    expected = theirs(torch.from_numpy(x))
    assert logits.numpy().dtype == np.float64
    np.testing.assert_allclose(logits.numpy(), expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    # a shorter sequence reads the first positions in both
    np.testing.assert_allclose(ours(x[:, :5]).numpy(), theirs(torch.from_numpy(x[:, :5])).detach().numpy(),
                               rtol=1e-10, atol=1e-12)

    F.cross_entropy(logits.reshape(-1, 65), y.reshape(-1)).backward()
    torch.nn.functional.cross_entropy(expected.reshape(-1, 65), torch.from_numpy(y).reshape(-1)).backward()
    their_parameters = dict(theirs.named_parameters())
    our_parameters = dict(ours.named_parameters())
    assert sorted(our_parameters) == sorted(their_parameters)
    for name, parameter in our_parameters.items():
        their_grad = their_parameters[name].grad.numpy()
        assert np.abs(their_grad).max() > 0, name  # every gradient is exercised
        np.testing.assert_allclose(np.asarray(parameter.grad), their_grad, rtol=1e-8, atol=1e-12, err_msg=name)


# ---- the same recipe from each framework's own init ----------------------------------------------
RECIPE = dict(block_size=32, n_layer=2, n_embd=64, n_head=4, batch_size=32, steps=300, lr=3e-3,
              betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, validation_windows=64, seed=0)


def _recipe_data():
    """(training batches, validation inputs, validation targets): the first ``steps`` batches of
    one shuffled DataLoader over the side-by-side training windows, and the first
    ``validation_windows`` side-by-side windows of the validation text."""
    text = load_text()
    x, y = text_windows(text.train, RECIPE["block_size"])
    loader = DataLoader(x, y, batch_size=RECIPE["batch_size"], shuffle=True,
                        rng=np.random.default_rng(RECIPE["seed"]), drop_last=True)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == RECIPE["steps"]:
            break
    assert len(batches) == RECIPE["steps"]
    x_val, y_val = text_windows(text.validation, RECIPE["block_size"])
    count = RECIPE["validation_windows"]
    return batches, x_val[:count], y_val[:count], text.vocabulary_size


def _train_ours(batches, x_val, y_val, vocabulary_size):
    model = TinyGPT(vocabulary_size, RECIPE["block_size"], RECIPE["n_layer"], RECIPE["n_embd"], RECIPE["n_head"],
                    rng=np.random.default_rng(RECIPE["seed"]))
    optimizer = AdamW(model.parameters(), lr=RECIPE["lr"], betas=RECIPE["betas"], eps=RECIPE["eps"],
                      weight_decay=RECIPE["weight_decay"])
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x).reshape(-1, vocabulary_size), y.reshape(-1)).backward()
        optimizer.step()
    model.eval()
    with no_grad():
        return float(F.cross_entropy(model(x_val).reshape(-1, vocabulary_size), y_val.reshape(-1)).numpy())


def _train_torch(batches, x_val, y_val, vocabulary_size):
    import torch

    torch.manual_seed(RECIPE["seed"])
    model = _torch_tiny_gpt().TorchTinyGPT(vocabulary_size, RECIPE["block_size"], RECIPE["n_layer"],
                                           RECIPE["n_embd"], RECIPE["n_head"])
    # one param group with every parameter, as ours: the decay applies to all of them
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], betas=RECIPE["betas"], eps=RECIPE["eps"],
                                  weight_decay=RECIPE["weight_decay"])
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        logits = model(torch.from_numpy(x)).reshape(-1, vocabulary_size)
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).reshape(-1)).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_val))
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, vocabulary_size),
                                                       torch.from_numpy(y_val).reshape(-1)))


@pytest.mark.torch
def test_the_same_recipe_in_pytorch_reaches_a_validation_loss_within_5_percent_of_ours():
    import torch  # noqa: F401  (the reference; _train_torch trains it)

    batches, x_val, y_val, vocabulary_size = _recipe_data()
    ours = _train_ours(batches, x_val, y_val, vocabulary_size)
    theirs = _train_torch(batches, x_val, y_val, vocabulary_size)
    print(f"validation loss after {RECIPE['steps']} steps: qatcore {ours:.4f}, PyTorch {theirs:.4f} "
          f"(uniform guess {math.log(vocabulary_size):.4f})")
    # both learned, far from the uniform guess, so agreeing within 5% says something
    assert ours < 2.8 and theirs < 2.8, (ours, theirs)
    assert abs(ours - theirs) <= 0.05 * theirs, (ours, theirs)
