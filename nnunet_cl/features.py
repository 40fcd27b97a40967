"""Feature taps on an unchanged network: collect intermediate outputs with forward hooks."""
from contextlib import contextmanager

from torch import nn


@contextmanager
def tap(modules: dict[str, nn.Module]):
    """Collect the outputs of `modules` during the forward passes run inside the block.

    >>> with tap({"dec1": net.decoder.stages[1]}) as feats:
    ...     logits = net(x)
    >>> feats["dec1"].shape

    The hooks are removed on exit, so the network (and its checkpoints) stay untouched. With nnU-Net's U-Net,
    decoder stage s is `net.decoder.stages[s]` (0 = coarsest); encoder skips come from `net.encoder(x)`.
    """
    features = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, key=k: features.__setitem__(key, out))
               for k, m in modules.items()]
    try:
        yield features
    finally:
        for h in handles:
            h.remove()


def decoder_stages(network: nn.Module, stages) -> dict[str, nn.Module]:
    """`{'dec<s>': network.decoder.stages[s]}` for nnU-Net's PlainConvUNet / ResidualEncoderUNet."""
    return {f"dec{s}": network.decoder.stages[s] for s in stages}


def unet_features(network: nn.Module, x, encoder=(), decoder=(), with_output: bool = True):
    """One pass through nnU-Net's U-Net: (segmentation output or None, {name: feature map}).

    `encoder` lists encoder stages, named 'enc<i>' (negative i counts from the bottleneck, as the skips list
    does), `decoder` lists decoder stages, named 'dec<s>' (0 = coarsest). The decoder runs only when its stages
    or the output are asked for, so an encoder-only objective pays for the encoder alone. A feature map's voxel
    grid is the input's, strided by
    x.shape[2:] / feature.shape[2:].
    """
    skips = network.encoder(x)
    features = {f"enc{i}": skips[i] for i in encoder}
    output = None
    if decoder or with_output:
        with tap(decoder_stages(network, decoder)) as decoded:
            output = network.decoder(skips)
        features.update(decoded)
    return output, features
