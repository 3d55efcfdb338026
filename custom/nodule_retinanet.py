"""The lung nodule detection network: MONAI's 3D RetinaNet on a ResNet-50 + FPN backbone.

MONAI's ``RetinaNet`` takes a feature-extractor object, which a job config cannot name,
so this class builds it from plain arguments (as MONAI's LUNA16 detection tutorial does).
The persistor, the trainer and the imaging agent all construct it the same way:

    model = NoduleRetinaNet(**args)   # the persistor's model args in the job config (job_configs/lung_nodule_detection)
    model.load_state_dict(torch.load("best_model.pt"))

Every argument but ``norm`` is required: the job config is the one place for the architecture. ``norm`` (MONAI's
``get_norm_layer`` spelling, default ``"batch"``) is the backbone's normalisation, every one of its layers: MONAI's
``ResNet`` applies its own ``norm`` argument to the stem only and builds its blocks with batch norm, so this class
puts the named norm in their place. ``["group", {"num_groups": 32}]`` is the one DP-SGD can train (the nodule job's
dp profile). ``bundle_config`` describes the same network with MONAI's own parts, for the fetched MONAI bundle, which
must not need this repository.
"""

import torch
from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import resnet


class NoduleRetinaNet(RetinaNet):
    def __init__(
        self,
        spatial_dims: int,
        n_input_channels: int,
        num_classes: int,
        num_anchors: int,
        backbone_layers: tuple,  # (3, 4, 6, 3): ResNet-50
        conv1_t_stride: tuple,
        conv1_t_size: tuple,
        returned_layers: tuple,
        norm: str | list = "batch",
    ):
        backbone = resnet.ResNet(
            block=resnet.ResNetBottleneck,
            layers=list(backbone_layers),
            block_inplanes=resnet.get_inplanes(),
            n_input_channels=n_input_channels,
            conv1_t_stride=list(conv1_t_stride),
            conv1_t_size=list(conv1_t_size),
        )
        if norm != "batch":
            replace_batch_norms(backbone, norm, spatial_dims)
        extractor = resnet_fpn_feature_extractor(
            backbone, spatial_dims, pretrained_backbone=False, returned_layers=list(returned_layers)
        )
        size_divisible = self.size_divisible_for(conv1_t_stride, returned_layers)
        super().__init__(spatial_dims, num_classes, num_anchors, extractor, size_divisible=size_divisible)

    @staticmethod
    def size_divisible_for(conv1_t_stride, returned_layers) -> list[int]:
        """The backbone's first stride times the FPN's downsampling: what input sizes must be divisible by."""
        return [int(s) * 2 * 2 ** max(returned_layers) for s in conv1_t_stride]

    @classmethod
    def bundle_config(cls, spatial_dims, n_input_channels, num_classes, num_anchors, backbone_layers, conv1_t_stride,
                      conv1_t_size, returned_layers, norm="batch") -> dict:  # fmt: skip
        """MONAI bundle config entries (``backbone``, ``feature_extractor``, ``network_def``) of the same network.
        With a ``norm`` other than batch norm, ``backbone_norms`` replaces the backbone's batch norms with it, as
        ``replace_batch_norms`` does (a MONAI config expression; the norm itself stays a literal entry)."""
        config = {
            "backbone": {
                "_target_": "monai.networks.nets.resnet.ResNet",
                "block": "$monai.networks.nets.resnet.ResNetBottleneck",
                "layers": list(backbone_layers),
                "block_inplanes": "$monai.networks.nets.resnet.get_inplanes()",
                "n_input_channels": n_input_channels,
                "conv1_t_stride": list(conv1_t_stride),
                "conv1_t_size": list(conv1_t_size),
            },
            "feature_extractor": {
                "_target_": "monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor",
                "backbone": "@backbone",
                "spatial_dims": spatial_dims,
                "pretrained_backbone": False,
                "returned_layers": list(returned_layers),
            },
            "network_def": {
                "_target_": "monai.apps.detection.networks.retinanet_network.RetinaNet",
                "spatial_dims": spatial_dims,
                "num_classes": num_classes,
                "num_anchors": num_anchors,
                "feature_extractor": "@feature_extractor",
                "size_divisible": cls.size_divisible_for(conv1_t_stride, returned_layers),
            },
        }
        if norm != "batch":
            config["backbone_norm"] = norm
            config["backbone_norms"] = (
                "$[setattr(parent, name, monai.networks.layers.utils.get_norm_layer(@backbone_norm, "
                f"{int(spatial_dims)}, child.num_features)) for parent in list(@backbone.modules()) "
                "for name, child in list(parent.named_children()) "
                "if isinstance(child, torch.nn.modules.batchnorm._BatchNorm)]"
            )
            config["feature_extractor"]["backbone"] = "$(@backbone_norms, @backbone)[1]"
        return config


def replace_batch_norms(module: torch.nn.Module, norm, spatial_dims: int) -> None:
    """Every batch norm under ``module`` replaced by a fresh ``norm`` layer of as many channels."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, get_norm_layer(norm, spatial_dims, child.num_features))
