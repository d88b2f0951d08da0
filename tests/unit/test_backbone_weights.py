"""Where stage 1's backbone starts: random, the timm hub (needs the network), or a local state dict file."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from pe_node.model import SliceEncoder
from training.fitting import backbone
from training.fitting.backbone import BackboneWeightsError, load_backbone_weights


def _imagenet_like(seed: int) -> dict[str, torch.Tensor]:
    """A state dict as timm saves a classifier: the backbone's weights plus a classifier head."""
    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=10).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_local_state_dict_loads_into_the_backbone_and_its_classifier_is_reported(tmp_path: Path,
                                                                                   suffix: str) -> None:
    state = _imagenet_like(1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    encoder = SliceEncoder("test_efficientnet")
    report = load_backbone_weights(encoder, str(path))
    own = encoder.backbone.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)
    assert report["missing"] == [] and report["mismatched"] == []
    assert report["unexpected"] == ["classifier.bias", "classifier.weight"]
    assert report["loaded"] == len(own)


def test_random_start_changes_nothing() -> None:
    torch.manual_seed(0)
    encoder = SliceEncoder("test_efficientnet")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert load_backbone_weights(encoder, False) == {"source": "random"}
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(BackboneWeightsError, match="none of its 1 tensors fit backbone 'test_efficientnet'"):
        load_backbone_weights(SliceEncoder("test_efficientnet"), str(path))


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(BackboneWeightsError, match="no such file"):
        load_backbone_weights(SliceEncoder("test_efficientnet"), str(tmp_path / "none.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="cannot be read as a state dict"):
        load_backbone_weights(SliceEncoder("test_efficientnet"), str(junk))


def test_hub_weights_without_network_say_how_to_use_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    encoder = SliceEncoder("test_efficientnet")
    monkeypatch.setattr(backbone.timm, "create_model", offline)
    with pytest.raises(BackboneWeightsError, match="timm model hub.*model.pretrained: /path/to/weights"):
        load_backbone_weights(encoder, True)


def test_hub_weights_load_when_timm_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    state = _imagenet_like(2)
    create_model = timm.create_model
    encoder = SliceEncoder("test_efficientnet")

    def from_hub(name: str, pretrained: bool, **kwargs: object) -> torch.nn.Module:
        assert pretrained and name == "test_efficientnet"
        model = create_model(name, pretrained=False, **kwargs)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier")})
        return model

    monkeypatch.setattr(backbone.timm, "create_model", from_hub)
    report = load_backbone_weights(encoder, True)
    assert report["source"].startswith("timm hub")
    assert torch.equal(encoder.backbone.conv_stem.weight, state["conv_stem.weight"])
