"""The network against Table 1 and the TensorFlow CIFAR-10 model's definitions."""
import numpy as np
import pytest
import torch

from iqals import model
from tests.conftest import close

# Table 1 of the paper: size-out (rows x cols x channels) of each layer.
TABLE1 = {"conv1": (32, 32, 64), "pool1": (16, 16, 64), "lrn1": (16, 16, 64), "conv2": (16, 16, 64),
          "lrn2": (16, 16, 64), "pool2": (8, 8, 64), "fc1": (384,), "fc2": (192,), "logits": (10,)}


@pytest.fixture(scope="module")
def net(params):
    return model.build(params.model, seed=0)


def table1_layers(net) -> dict:
    """Table 1's layers in its order and with its relus, made of the network's own modules (forward
    pools before the relu and is checked against this order in test_model_fast.py)."""
    return {"conv1": lambda x: torch.relu(net.conv1(x)), "pool1": model.pool_same, "lrn1": net.lrn,
            "conv2": lambda x: torch.relu(net.conv2(x)), "lrn2": net.lrn, "pool2": model.pool_same,
            "fc1": lambda x: torch.relu(net.fc1(x.flatten(1))), "fc2": lambda x: torch.relu(net.fc2(x)),
            "logits": net.out}


def test_layer_shapes_match_table1(net):
    layers = table1_layers(net)
    assert list(layers) == list(TABLE1)
    x = torch.randn(2, 3, 32, 32)
    for name, shape in TABLE1.items():
        x = layers[name](x)
        want = (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape  # NCHW
        assert tuple(x.shape[1:]) == want, name


def test_parameter_count(net):
    assert sum(p.numel() for p in net.parameters()) == 1_756_426


def test_forward_equals_table1_order(net):
    x = torch.randn(3, 3, 32, 32)
    y = x
    for layer in table1_layers(net).values():
        y = layer(y)
    torch.testing.assert_close(net(x), y)


def test_initialisation_follows_tf_model(params, net):
    m = params.model
    for layer, std in [(net.conv1, m.conv_std), (net.conv2, m.conv_std), (net.fc1, m.fc_std), (net.fc2, m.fc_std),
                       (net.out, m.out_std)]:
        w = layer.weight.detach()
        assert w.abs().max() <= 2 * std + 1e-9  # truncated at 2 std
        # std of a normal truncated at +-2 sigma is 0.8796 sigma
        assert abs(w.std().item() / std - 0.8796) < 0.05
    assert torch.all(net.conv1.bias == m.conv1_bias) and torch.all(net.conv2.bias == m.conv2_bias)
    assert torch.all(net.fc1.bias == m.fc_bias) and torch.all(net.fc2.bias == m.fc_bias)
    assert torch.all(net.out.bias == m.out_bias)


def test_init_is_seeded(params):
    a, b, c = model.build(params.model, 1), model.build(params.model, 1), model.build(params.model, 2)
    assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_weight_decay_only_on_hidden_fc_weights(net):
    assert [id(p) for p in net.decayed_parameters()] == [id(net.fc1.weight), id(net.fc2.weight)]


def test_lrn_matches_tf_formula(net):
    """TF: a / (bias + alpha * sum_{|d'-d|<=4} a_d'^2)^beta with alpha = 0.001/9."""
    a = torch.rand(1, 64, 4, 4, dtype=torch.float64) * 5
    x = a.numpy()[0]
    sq = np.zeros_like(x)
    for d in range(64):
        sq[d] = (x[max(0, d - 4):d + 5] ** 2).sum(0)
    want = x / (1.0 + 0.001 / 9 * sq) ** 0.75
    np.testing.assert_allclose(net.lrn(a).numpy()[0], want, rtol=1e-10)


def test_same_max_pool_matches_tf_padding():
    """TF SAME pooling 3x3/2 on 32: out 16, window i covers rows 2i..2i+2 clipped to the image."""
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    got = model.pool_same(x).numpy()[0, 0]
    a = x.numpy()[0, 0]
    want = np.array([[a[2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(16)] for i in range(16)])
    np.testing.assert_array_equal(got, want)


def test_per_image_standardisation():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x[1] = 7  # constant image: std floored at 1/sqrt(3072), so the output is 0 not NaN
    x[2] = 7
    x[2, 0, 0, 0] = 8  # std 0.018, under the floor 0.018042: the floor's value decides the output
    got = model.standardize(x).numpy()
    a = x.numpy().astype(np.float64).reshape(4, -1)
    want = (a - a.mean(1, keepdims=True)) / np.maximum(a.std(1, keepdims=True), 1 / np.sqrt(3072))
    close(got.reshape(4, -1), want, 3072)  # float32 against float64: sums over 3,072 values
    assert np.all(got[1] == 0)
    assert a[2].std() < 1 / np.sqrt(3072) and got[2].max() == pytest.approx((1 - 1 / 3072) * np.sqrt(3072), rel=1e-6)


def test_stack_keeps_the_lrn_constants():
    """Net.stack of one-group networks whose LRN is not the default one: each run's logits are its own network's
    (float64, conv2's 5 x 5 x 64-term sums); default constants in the stack would change them at O(1)."""
    torch.manual_seed(0)
    singles = [model.Net(1, 5, 0.5, 0.6, 2.0).double() for _ in range(2)]
    x = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    y = model.Net.stack(singles)(x)
    for g, net in enumerate(singles):
        close(y[g], net(x[g]), 5 * 5 * 64, f"run {g}")


def test_pick_device(monkeypatch):
    """train.device: 'auto' is the GPU where there is one, else the CPU; 'cuda' without one is a params error."""
    from iqals.params import ParamError

    assert model.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model.pick_device("auto") == torch.device("cpu")
    with pytest.raises(ParamError, match="train.device = 'cuda' but no CUDA device"):
        model.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model.pick_device("auto") == torch.device("cuda") == model.pick_device("cuda")
