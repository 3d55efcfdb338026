"""The lung nodule detection network: MONAI's 3D RetinaNet on a ResNet-50 + FPN backbone.

MONAI's ``RetinaNet`` takes a feature-extractor object, which a job config cannot name,
so this class builds it from plain arguments (as MONAI's LUNA16 detection tutorial does).
The persistor, the trainer and the imaging agent all construct it the same way:

    model = NoduleRetinaNet(**args)   # args as in job_configs/lung_nodule_detection/config_fed_server.json
    model.load_state_dict(torch.load("best_model.pt"))
"""

from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
from monai.networks.nets import resnet


class NoduleRetinaNet(RetinaNet):
    def __init__(
        self,
        spatial_dims: int = 3,
        n_input_channels: int = 1,
        num_classes: int = 1,
        num_anchors: int = 3,
        backbone_layers: tuple = (3, 4, 6, 3),  # ResNet-50
        conv1_t_stride: tuple = (2, 2, 1),
        conv1_t_size: tuple = (7, 7, 7),
        returned_layers: tuple = (1, 2),
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
        size_divisible = [s * 2 * 2 ** max(returned_layers) for s in extractor.body.conv1.stride]
        super().__init__(spatial_dims, num_classes, num_anchors, extractor, size_divisible=size_divisible)
