"""Every normalization variant, one record each.

``ALL_SPECS`` lists the records explicitly (adding a variant is one file plus one line here);
the generic tests, ``refnorm verify``, the golden oracle and the docs iterate it. Each variant
lives in its own module (``refnorm.norms.layer_norm``); the differentiable ops of all of them,
by name, are in :mod:`refnorm.functional`.
"""
from refnorm.norms import layer_norm as _layer_norm
from refnorm.norms import rms_norm as _rms_norm
from refnorm.norms import group_norm as _group_norm
from refnorm.norms import batch_norm as _batch_norm
from refnorm.norms import instance_norm as _instance_norm
from refnorm.norms import local_response_norm as _local_response_norm
from refnorm.norms import weight_norm as _weight_norm
from refnorm.norms import spectral_norm as _spectral_norm
from refnorm.norms import ibn_net as _ibn_net
from refnorm.norms import batch_renorm as _batch_renorm
from refnorm.norms import alpha_bn as _alpha_bn
from refnorm.norms import switchable_norm as _switchable_norm
from refnorm.norms import region_norm as _region_norm
from refnorm.norms import spade as _spade
from refnorm.norms import crms_norm as _crms_norm
from refnorm.norms import power_norm as _power_norm
from refnorm.norms import unified_norm as _unified_norm
from refnorm.norms import rep_bn as _rep_bn
from refnorm.norms import dyt as _dyt
from refnorm.norms import l2_norm as _l2_norm
from refnorm.norms import qk_norm as _qk_norm
from refnorm.norms import layer_norm_scaling as _layer_norm_scaling
from refnorm.norms import power_softmax as _power_softmax
from refnorm.norms import sigma_reparam as _sigma_reparam
from refnorm.norms import weight_standardization as _weight_standardization
from refnorm.norms import filter_response_norm as _filter_response_norm
from refnorm.norms import weight_compander as _weight_compander
from refnorm.norms import evo_norm as _evo_norm
from refnorm.norms import batch_channel_norm as _batch_channel_norm
from refnorm.norms import fused_add_norm as _fused_add_norm

ALL_SPECS = (
    _layer_norm.SPEC,
    _rms_norm.SPEC,
    _group_norm.SPEC,
    _batch_norm.SPEC,
    _instance_norm.SPEC,
    _local_response_norm.SPEC,
    _weight_norm.SPEC,
    _spectral_norm.SPEC,
    _ibn_net.SPEC_A,
    _ibn_net.SPEC_B,
    _batch_renorm.SPEC,
    _alpha_bn.SPEC,
    _switchable_norm.SPEC,
    _region_norm.SPEC_B,
    _region_norm.SPEC_L,
    _spade.SPEC,
    _crms_norm.SPEC,
    _power_norm.SPEC,
    _unified_norm.SPEC,
    _rep_bn.REP_SPEC,
    _rep_bn.PREP_SPEC,
    _dyt.SPEC,
    _l2_norm.SPEC,
    _qk_norm.SPEC,
    _layer_norm_scaling.SPEC,
    _power_softmax.SPEC,
    _sigma_reparam.SPEC,
    _weight_standardization.SPEC,
    _weight_standardization.SCALED_SPEC,
    _filter_response_norm.SPEC,
    _weight_compander.SPEC,
    _evo_norm.SPEC_B0,
    _evo_norm.SPEC_S0,
    _batch_channel_norm.SPEC,
    _fused_add_norm.ADD_RMS_SPEC,
    _fused_add_norm.ADD_LAYER_SPEC,
)

BY_NAME = {spec.name: spec for spec in ALL_SPECS}

__all__ = ["ALL_SPECS", "BY_NAME"]
