"""Bad input: one clear error naming the key and what is allowed, before any work."""

import pytest

import gdlab
from gdlab.compose import compose_config
from gdlab.config import ConfigError, validate


def run(overrides):
    return gdlab.run([*overrides, "tracking=none"])


BAD = [
    (["optimizer.lr=0"], "optimizer.lr=0 is out of range; allowed: a number > 0"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is out of range"),
    (["model.depth=-1"], "model.depth=-1 is out of range; allowed: an integer >= 0"),
    (["model.width=0"], "model.width=0 is out of range; allowed: an integer >= 1"),
    (["model.depth=2", "model.width=[4,0]"], "model.width.1=0 is out of range"),
    (["model.depth=3", "model.width=[4,4]"], "model.width=[4, 4] has 2 entries but model.depth=3"),
    (
        ["optimizer=backtracking", "optimizer.c=1"],
        "optimizer.c=1 is out of range; allowed: a number in (0, 1)",
    ),
    (["optimizer=backtracking", "optimizer.beta=0"], "optimizer.beta=0 is out of range"),
    (
        ["optimizer=backtracking", "optimizer.reset=often"],
        "optimizer.reset='often' is not allowed; choose one of initial|previous|grow",
    ),  # noqa: E501
    (["optimizer=backtracking", "optimizer.on_failure=x"], "choose one of revert|tiny_step"),
    (["model.activation=gelu"], "model.activation='gelu' is not allowed; choose one of sigmoid|tanh|relu"),
    (["model.head=sigmoid", "dataset=digits"], "model.head=sigmoid fits 2 classes but dataset=digits has 10"),
    (["loss=ce"], "loss=ce needs model.head=softmax; with model.head=sigmoid choose loss from bce|mse"),
    (["dataset.test_size=1"], "dataset.test_size=1 is out of range; allowed: a number in [0, 1)"),
    (["dataset.test_size=-0.1"], "dataset.test_size=-0.1 is out of range"),
    (["dataset=xor", "objective=test/acc"], "objective='test/acc' needs a test split"),
    (
        ["objective=accuracy"],
        "objective='accuracy' is not allowed; choose one of train/loss|train/acc|test/loss|test/acc",
    ),  # noqa: E501
    (["direction=up"], "direction='up' is not allowed; choose one of minimize|maximize"),
    (["backprop=numeric"], "backprop='numeric' is not allowed; choose one of autograd|manual"),
    (["trainer.precision=16"], "trainer.precision=16 is not allowed; choose one of 32|64"),
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu' is not allowed; choose one of auto|cpu|gpu"),
    (["optimizer.lr=fast"], "optimizer.lr='fast' must be a number"),
    (["init=small", "init.std=0"], "init.std=0 is out of range"),
    (["optimizer=sgd", "optimizer.batch_size=0"], "optimizer.batch_size=0 is out of range"),
    (
        ["optimizer=momentum", "optimizer.momentum=0", "optimizer.nesterov=true"],
        "optimizer.nesterov=true needs",
    ),
    # NaN and inf are bad input wherever a finite number is meant
    (["optimizer.lr=nan"], "optimizer.lr=nan is not allowed; allowed: a finite number > 0"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is not allowed; allowed: a finite number > 0"),
    (["init=small", "init.std=nan"], "init.std=nan is not allowed"),
    (["trainer.stop_loss=nan"], "trainer.stop_loss=nan is not allowed"),
    (["optimizer=backtracking", "optimizer.growth=inf"], "optimizer.growth=inf is not allowed"),
    (["dataset.noise=nan"], "dataset.noise=nan is not allowed; allowed: a finite number in [0, 100.0]"),
    # what numpy, scikit-learn or the allocator would refuse with a traceback
    (["seed=4294967296"], "seed=4294967296 is out of range; allowed: an integer in [0, 4294967295]"),
    (["dataset.random_state=-1"], "dataset.random_state=-1 is out of range"),
    (["dataset=xor", "dataset.test_size=0.8"], "dataset.test_size=0.8 leaves no training rows of the 4"),
    (["dataset.n_samples=4", "dataset.test_size=0.9"], "leaves no training rows of the 4 in dataset=moons"),
    (["model.width=1000000000"], "model.width=1000000000 model.depth=1 needs about"),
    (["dataset=moons", "dataset.n_samples=null"], "dataset.n_samples=None must be an integer"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_input_names_key_and_allowed_values(overrides, message):
    with pytest.raises(ConfigError) as error:
        run(overrides)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("uri", "message"),
    [("ftp://h/x", "tracking.uri='ftp://h/x' is not allowed with tracking=server; use an http:// or https://"),
     ("postgresql://u:pw@h/db", "tracking.uri='postgresql://u:***@h/db' is not allowed")],
)  # fmt: skip
def test_a_tracking_server_url_is_http(uri, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(["tracking=server", f"tracking.uri={uri}"]))
    assert message in str(error.value)


def test_auto_head_and_loss_resolve_from_the_dataset():
    assert validate(compose_config(["dataset=digits"])).model.head == "softmax"
    cfg = validate(compose_config(["dataset=moons"]))
    assert (cfg.model.head, cfg.loss) == ("sigmoid", "bce")
    cfg = validate(compose_config(["dataset=xor", "model.head=softmax", "loss=mse"]))
    assert (cfg.model.head, cfg.loss) == ("softmax", "mse")


def test_gpu_request_without_a_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu but no CUDA GPU is available"):
        run(["trainer.accelerator=gpu"])
