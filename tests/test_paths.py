"""nnunet_cl.paths: plans configuration inheritance and dataset layout detection."""
import pytest

from nnunet_cl.paths import NnUNetCLError, is_msd_dataset_json, resolved_configuration


def test_inheritance_parents_first_child_wins():
    plans = {"configurations": {"3d_fullres": {"data_identifier": "full", "spacing": [1, 1, 1], "batch_size": 2},
                                "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "low",
                                              "spacing": [2, 2, 2]},
                                "3d_lowres_big": {"inherits_from": "3d_lowres", "batch_size": 4}}}
    assert resolved_configuration(plans, "3d_lowres_big") == {"data_identifier": "low", "spacing": [2, 2, 2],
                                                               "batch_size": 4}
    assert resolved_configuration(plans, "3d_fullres") == plans["configurations"]["3d_fullres"]
    assert "inherits_from" in plans["configurations"]["3d_lowres"]  # the plans are not changed


def test_unknown_parent_and_cycles_are_refused():
    with pytest.raises(NnUNetCLError, match="'gone' is not in the plans.*Fix: "):
        resolved_configuration({"configurations": {"a": {"inherits_from": "gone"}}}, "a")
    with pytest.raises(NnUNetCLError, match="inherits in a circle"):
        resolved_configuration({"configurations": {"a": {"inherits_from": "b"}, "b": {"inherits_from": "a"}}}, "a")


def test_msd_layout():
    assert is_msd_dataset_json({"modality": {"0": "MRI"}, "labels": {}})
    assert not is_msd_dataset_json({"channel_names": {"0": "MRI"}, "labels": {}})
    assert not is_msd_dataset_json({"modality": {"0": "MRI"}, "channel_names": {"0": "MRI"}})
