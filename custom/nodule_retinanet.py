"""The lung nodule detection network: MONAI's 3D RetinaNet on a ResNet-50 + FPN backbone.

MONAI's ``RetinaNet`` takes a feature-extractor object, which a job config cannot name,
so this class builds it from plain arguments (as MONAI's LUNA16 detection tutorial does).
The persistor, the trainer and the imaging agent all construct it the same way:

    model = NoduleRetinaNet(**args)   # the persistor's model args in the job config (job_configs/lung_nodule_detection)
    model.load_state_dict(torch.load("best_model.pt"))

Every argument is required: the job config is the one place for the architecture. ``bundle_config`` describes
the same network with MONAI's own parts, for the fetched MONAI bundle, which must not need this repository.
"""

from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
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
    ):
        backbone = resnet.ResNet(
            block=resnet.ResNetBottleneck,
            layers=list(backbone_layers),
            block_inplanes=resnet.get_inplanes(),
            n_input_channels=n_input_channels,
            conv1_t_stride=list(conv1_t_stride),
            conv1_t_size=list(conv1_t_size),
        )
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
                      conv1_t_size, returned_layers) -> dict:  # fmt: skip
        """MONAI bundle config entries (``backbone``, ``feature_extractor``, ``network_def``) of the same network."""
        return {
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
