import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_cl.features import decoder_stages, tap, unet_features


def test_decoder_taps_give_stage_outputs_and_leave_no_hooks():
    net = PlainConvUNet(1, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), True,
                        nn.InstanceNorm3d, {"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=False)
    x = torch.randn(2, 1, 16, 16, 16)
    with tap(decoder_stages(net, [0, 1])) as feats:
        out = net(x)
    assert feats["dec0"].shape == (2, 16, 8, 8, 8) and feats["dec1"].shape == (2, 8, 16, 16, 16)
    assert out.shape == (2, 2, 16, 16, 16)
    assert feats["dec1"].requires_grad  # usable in a loss
    assert all(len(s._forward_hooks) == 0 for s in net.decoder.stages)
    assert set(net.state_dict()) == set(PlainConvUNet(1, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2,
                                                      (1, 1), True, nn.InstanceNorm3d, {"affine": True},
                                                      nonlin=nn.LeakyReLU).state_dict())


def test_unet_features_is_the_network_forward_and_runs_the_decoder_only_when_asked():
    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), True,
                        nn.InstanceNorm3d, {"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=False)
    x = torch.randn(2, 1, 16, 16, 16)
    out, feats = unet_features(net, x, encoder=(-1,), decoder=(1,))
    assert torch.equal(out, net(x))
    assert feats["enc-1"].shape == (2, 32, 4, 4, 4) and feats["dec1"].shape == (2, 8, 16, 16, 16)
    calls = []
    net.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    out, feats = unet_features(net, x, encoder=(0, -1), with_output=False)
    assert out is None and set(feats) == {"enc0", "enc-1"} and not calls
