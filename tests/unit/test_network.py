"""The attention U-Net: shapes, the pinned size of the thesis network, bad arguments."""

import re

import pytest
import torch

from model.network import AttentionGate, AttentionUNet, UNetConfig, fold_batchnorm

TINY = UNetConfig(filters=(8, 16, 32, 64))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_thesis_network_has_7_85_million_parameters():
    assert n_params(AttentionUNet()) == 7_850_713


def test_full_size_network_gives_logits_of_input_shape():
    net = AttentionUNet().eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (3, 1, 32, 48), (2, 1, 8, 8)])
def test_small_network_output_shape(shape):
    net = AttentionUNet(TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(shape)).shape == shape


def test_channels_and_depth_follow_the_config():
    net = AttentionUNet(UNetConfig(in_channels=3, out_channels=2, filters=(4, 8), dropout=0.0)).eval()
    assert net(torch.randn(2, 3, 6, 10)).shape == (2, 2, 6, 10)
    assert len(net.gates) == 1 and len(net.encoder) == 1


def test_one_attention_gate_per_skip_connection():
    net = AttentionUNet()
    assert len(net.gates) == 4 and all(isinstance(g, AttentionGate) for g in net.gates)
    assert [g.w_x[0].in_channels for g in net.gates] == [256, 128, 64, 32]
    assert [g.w_x[0].out_channels for g in net.gates] == [128, 64, 32, 16]


def test_dropout_is_active_only_in_training():
    net = AttentionUNet(UNetConfig(filters=(4, 8, 16), dropout=0.3))
    x = torch.randn(2, 1, 16, 16)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))


def test_gradients_reach_every_parameter():
    net = AttentionUNet(TINY).train()
    net(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_config_from_lists_becomes_tuple():
    assert UNetConfig(filters=[8, 16]).filters == (8, 16)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"filters": (32,)}, "(32,)"),
        ({"filters": (8, 0, 16)}, "0"),
        ({"filters": (8, 16.5)}, "16.5"),
        ({"filters": 32}, "32"),
        ({"dropout": 1.0}, "1.0"),
        ({"dropout": -0.1}, "-0.1"),
        ({"in_channels": 0}, "0"),
        ({"out_channels": "1"}, "'1'"),
    ],
)
def test_bad_config_raises_value_error_naming_the_value(kwargs, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        UNetConfig(**kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 20, 16), (1, 1, 16, 12), (1, 2, 16, 16), (1, 16, 16)])
def test_bad_input_raises_value_error(shape):
    net = AttentionUNet(TINY)  # needs H, W divisible by 8
    with pytest.raises(ValueError, match="divisible by 8|expected input"):
        net(torch.randn(shape))


def _trained_looking(config: UNetConfig, seed: int = 0) -> AttentionUNet:
    """A network whose BatchNorms are not the identity: scale, shift and running statistics all set."""
    torch.manual_seed(seed)
    net = AttentionUNet(config)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.3, 3.0)
    return net.eval()


@pytest.mark.parametrize("config", [TINY, UNetConfig(filters=(4, 8, 16), dropout=0.3)])
def test_folding_batchnorm_keeps_the_outputs_and_leaves_the_network_alone(config):
    net = _trained_looking(config)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training
    # every conv that had a BatchNorm after it now carries that BatchNorm's shift as its bias
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == sum(
        isinstance(m, torch.nn.Conv2d) and m.bias is not None for m in folded.modules()) - sum(
        isinstance(m, torch.nn.Conv2d) and m.bias is not None for m in net.modules())
    x = torch.randn(3, 1, 32, 48)
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-5)
        cl = fold_batchnorm(net).to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), expected, rtol=0, atol=1e-5)
    # the network as trained is untouched: its BatchNorms, its weights, its state dict's keys
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) > 0
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
