"""marginkern: fused streaming kernels for losses over very many classes.

    import marginkern as mk
    loss = mk.margin_cross_entropy(embeddings, class_centres, labels)      # ArcFace by default
    loss = mk.ArcFaceLoss(512, 1_000_000).cuda()(embeddings, labels)

See DESIGN.md for the math; `marginkern.reference` holds the plain-PyTorch oracles and
`marginkern.dispatch.explain()` says which backend serves which device.
"""
from . import huggingface, open_clip, reference  # noqa: F401  (open_clip: mk.open_clip.ClipLoss, not in __all__)
from .contrastive import InfoNCELoss, SigLIPLoss, SupConLoss, info_nce_loss, siglip_loss, supcon_loss
from .adaptive_margins import AdaFaceLoss, ElasticArcFaceLoss, ElasticCosFaceLoss, MagFaceLoss
from .dispatch import BackendUnavailable
from .hard_negatives import CurricularFaceLoss, MVSoftmaxLoss
from .functional import (circle_loss, cosent_embedding_loss, cosent_loss, emo_cross_entropy, emo_loss,
                         global_pointer_loss, linear_cross_entropy, linear_jsd, linear_kl_divergence, linear_topk,
                         linear_topk_kl_divergence,
                         log_probs_and_entropy,
                         margin_cross_entropy, multilabel_categorical_crossentropy, proxy_anchor_loss,
                         sparse_multilabel_categorical_crossentropy)
from .grpo import GRPOOutput, LinearGRPOLoss, grpo_loss
from .preference import (LinearCPOLoss, LinearDPOLoss, LinearKTOLoss, LinearORPOLoss, LinearSimPOLoss, cpo_loss,
                         dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, sequence_log_probs)
from .modules import (ArcFaceLoss, CombinedMarginLoss, CoSENTLoss, CosFaceLoss, EMOLoss, LargeMarginSoftmaxLoss,
                      LinearCrossEntropyLoss, LinearDistillationLoss, NormalizedSoftmaxLoss, ProxyAnchorLoss,
                      SphereFaceLoss, SubCenterArcFaceLoss)

__version__ = "0.1.0"

__all__ = [
    "margin_cross_entropy", "linear_cross_entropy", "LinearCrossEntropyLoss", "emo_loss",
    "emo_cross_entropy", "EMOLoss", "log_probs_and_entropy", "linear_kl_divergence", "linear_jsd",
    "linear_topk_kl_divergence", "linear_topk",
    "LinearDistillationLoss", "cosent_loss",
    "cosent_embedding_loss", "CoSENTLoss",
    "multilabel_categorical_crossentropy", "sparse_multilabel_categorical_crossentropy",
    "global_pointer_loss", "circle_loss", "proxy_anchor_loss", "ProxyAnchorLoss",
    "NormalizedSoftmaxLoss", "info_nce_loss", "InfoNCELoss", "siglip_loss", "SigLIPLoss",
    "supcon_loss", "SupConLoss",
    "sequence_log_probs", "dpo_loss", "orpo_loss", "cpo_loss", "kto_loss", "kto_kl_estimate", "LinearDPOLoss",
    "LinearORPOLoss", "LinearCPOLoss", "LinearSimPOLoss", "LinearKTOLoss", "grpo_loss", "LinearGRPOLoss", "GRPOOutput",
    "ArcFaceLoss", "SubCenterArcFaceLoss", "CosFaceLoss",
    "SphereFaceLoss", "CombinedMarginLoss",
    "LargeMarginSoftmaxLoss", "AdaFaceLoss", "MagFaceLoss", "ElasticArcFaceLoss", "ElasticCosFaceLoss",
    "CurricularFaceLoss", "MVSoftmaxLoss",
    "BackendUnavailable", "reference", "huggingface",
]
