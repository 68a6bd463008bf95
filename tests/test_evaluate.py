"""Clean accuracy, ASR (CSAW semantics), and guarded-model rates on hand-made models whose answers we control."""

import pytest
import torch
from torch import nn

from netcleanse import Classifier, NetcleanseError, NetcleanseWarning
from netcleanse.data import Dataset
from netcleanse.evaluate import Evaluation, accuracy, evaluate, predict_dataset

K = 10


class FirstPixelNet(nn.Module):
    """Answers k when the top-left pixel is k/(K-1): logits -(p - k/(K-1))^2 peak at the nearest k."""

    def forward(self, x):
        p = x[:, 0, 0, 0:1]
        centers = torch.arange(K, dtype=torch.float32) / (K - 1)
        return -(p - centers) ** 2


class GuardNet(nn.Module):
    """FirstPixelNet plus class K ("poisoned") whenever the bottom-right pixel is lit (a toy trigger)."""

    def forward(self, x):
        base = FirstPixelNet()(x)
        flagged = (x[:, 0, -1, -1] > 0.5).float().unsqueeze(1) * 10.0 - 5.0
        return torch.cat([base, flagged], dim=1)


class StandInGuarded(Classifier):
    """Test-local stand-in for netcleanse.guard's guarded classifier: N+1 classes, poison_label N."""

    poison_label = K


def images(labels, trigger=None):
    x = torch.zeros(len(labels), 1, 4, 4)
    x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32) / (K - 1)
    if trigger is not None:
        x[:, 0, -1, -1] = torch.tensor(trigger, dtype=torch.float32)
    return x


@pytest.fixture
def model():
    return Classifier(FirstPixelNet(), (1, 4, 4), K, name="toy")


def test_clean_accuracy_counts_exact_hits(model):
    answers = [0, 1, 2, 3, 4, 5, 6, 7]
    truth = torch.tensor([0, 1, 2, 3, 9, 9, 9, 9])  # half right
    clean = Dataset(images(answers), truth)
    result = evaluate(model, clean=clean, batch_size=3)  # batches of 3 cover the ragged end
    assert result.clean_accuracy == pytest.approx(0.5)
    assert result.n_clean == 8 and result.attack_success is None and result.poison_detection is None
    assert accuracy(model, clean) == pytest.approx(0.5)


def test_asr_with_explicit_target_and_with_per_row_labels(model):
    poisoned = Dataset(images([2, 2, 2, 5]), torch.tensor([2, 2, 7, 7]))
    with_target = evaluate(model, poisoned=poisoned, target=2)
    assert with_target.attack_success == pytest.approx(0.75) and with_target.target == 2
    assert with_target.n_poisoned == 4 and with_target.clean_accuracy is None
    # without --target, each row's own label is its target (CSAW poisoned files)
    assert evaluate(model, poisoned=poisoned).attack_success == pytest.approx(0.5)


def test_ordinary_model_has_no_detection_rates(model):
    result = evaluate(model, Dataset(images([1]), torch.tensor([1])), Dataset(images([3])), target=3)
    assert result.clean_accuracy == 1.0 and result.attack_success == 1.0
    assert result.poison_detection is None and result.false_positive is None and result.poison_label is None
    assert set(result.to_dict()) == {"clean_accuracy", "attack_success", "poison_detection", "false_positive",
                                     "n_clean", "n_poisoned", "target", "poison_label"}


def test_guarded_model_detection_and_false_positive_rates():
    guarded = StandInGuarded(GuardNet(), (1, 4, 4), K + 1, name="guarded")
    # 4 clean inputs, one of which the guard wrongly flags
    clean = Dataset(images([1, 2, 3, 4], trigger=[0, 0, 0, 1]), torch.tensor([1, 2, 3, 4]))
    # 5 poisoned inputs that reach target 0 unless the guard flags them (it catches 3)
    poisoned = Dataset(images([0, 0, 0, 0, 0], trigger=[1, 1, 1, 0, 0]), torch.full((5,), 0))
    result = evaluate(guarded, clean, poisoned, target=0)
    assert result.poison_label == K
    assert result.clean_accuracy == pytest.approx(0.75)
    assert result.false_positive == pytest.approx(0.25)
    assert result.poison_detection == pytest.approx(0.6)
    assert result.attack_success == pytest.approx(0.4)  # the flagged ones no longer reach the target
    labels, _ = predict_dataset(guarded, poisoned)
    assert labels.tolist() == [K, K, K, 0, 0]
    # the guard's own answer is no attack target (its "attack success" would be the detection rate)
    with pytest.raises(NetcleanseError, match=f"target {K} is outside .*the guard's answer"):
        evaluate(guarded, poisoned=poisoned, target=K)
    with pytest.raises(NetcleanseError, match="label"):  # nor a label of the data
        evaluate(guarded, Dataset(clean.x, torch.tensor([1, 2, 3, K])))


def test_predictions_run_in_eval_mode_without_grad(model):
    class ModeSpy(nn.Module):
        def forward(self, x):
            assert not self.training and not torch.is_grad_enabled()
            return FirstPixelNet()(x)

    spy = Classifier(ModeSpy(), (1, 4, 4), K).train()
    labels, confidence = predict_dataset(spy, Dataset(images([3, 4])))
    assert labels.tolist() == [3, 4] and spy.training  # the caller's mode is restored
    assert ((confidence > 0) & (confidence <= 1)).all()


def test_bad_inputs(model):
    with pytest.raises(NetcleanseError, match="nothing to evaluate"):
        evaluate(model)
    with pytest.raises(NetcleanseError, match="no labels"):
        evaluate(model, clean=Dataset(images([1])))
    with pytest.raises(NetcleanseError, match="poisoned data has no labels"):
        evaluate(model, poisoned=Dataset(images([1])))
    with pytest.raises(NetcleanseError, match=r"target 10 is outside \[0, 10\)"):
        evaluate(model, poisoned=Dataset(images([1])), target=10)
    with pytest.raises(NetcleanseError, match=r"label 12 is outside \[0, 10\)"):
        evaluate(model, clean=Dataset(images([1]), torch.tensor([12])))
    with pytest.raises(NetcleanseError, match="images are 1x5x5 .* expects 1x4x4"):
        evaluate(model, clean=Dataset(torch.zeros(1, 1, 5, 5), torch.tensor([0])))
    # with an explicit target, the poisoned set's own labels are not used, so not checked
    assert evaluate(model, poisoned=Dataset(images([1]), torch.tensor([99])), target=1).attack_success == 1.0


def test_evaluation_is_a_plain_record():
    assert Evaluation().to_dict()["clean_accuracy"] is None


def test_non_finite_outputs_are_an_error_not_an_answer():
    class Overflow(nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 3)
            out[0, 1] = float("nan")
            return out

    model = Classifier(Overflow(), (1, 4, 4), 3, name="overflow")
    with pytest.raises(NetcleanseError, match="NaN or infinite for 1 of 2 inputs"):
        model.predict(torch.rand(2, 1, 4, 4))
    with pytest.raises(NetcleanseError, match="NaN or infinite"):
        model.predict_proba(torch.rand(2, 1, 4, 4))


def test_predict_reads_integer_images_as_0_to_255_and_refuses_floats_outside_0_1(model):
    # Classifier.predict on arrays as users have them: uint8 images are 0..255 (as load_data reads
    # them); float pixels beyond [0, 1] would be fed as they are, every answer wrong: refused
    import numpy as np
    x = images([0, 3, 9])
    as_uint8 = np.round(x.numpy() * 255).astype(np.uint8)
    assert model.predict(as_uint8).tolist() == [0, 3, 9]
    linear = Classifier.wrap(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), (1, 4, 4))
    assert torch.equal(linear.predict(x.numpy().astype(np.float64)), linear.predict(x))  # float64: as float32
    assert model.predict(torch.from_numpy(as_uint8)).tolist() == [0, 3, 9]
    with pytest.raises(NetcleanseError, match="pixels must be in \\[0, 1\\], got values from 0 to 255: divide"):
        model.predict(x * 255)
    with pytest.raises(NetcleanseError, match="NaN or infinite pixels"):
        model.predict_proba(np.full((1, 1, 4, 4), np.nan, dtype=np.float32))
    with pytest.warns(NetcleanseWarning, match="pixels outside \\[0, 1\\] .*normalised twice"):
        model.predict((x - 0.5) / 0.25)  # normalised already
    with pytest.raises(NetcleanseError, match="integer images must be 0..255"):
        model.predict(np.full((1, 1, 4, 4), 300, dtype=np.int32))
    assert model.predict(x + 1e-4).tolist() == [0, 3, 9]  # rounding is not another range


def test_images_of_another_layout_say_how_to_fix_them():
    model = Classifier.wrap(nn.Sequential(nn.Flatten(), nn.Linear(60, 3)), (3, 4, 5))
    x = torch.rand(2, 3, 4, 5)
    with pytest.raises(NetcleanseError, match=r"one image without the batch axis \(give x\[None\]\)"):
        model.predict(x[0])
    with pytest.raises(NetcleanseError, match=r"channels last .*x.transpose\(0, 3, 1, 2\)"):
        model.predict(x.permute(0, 2, 3, 1).numpy())
    with pytest.raises(NetcleanseError, match=r"images are 2x3x5x4 but the model 'model' expects Nx3x4x5 \(N x C x H x W\)$"):
        model.predict(x.transpose(2, 3))
    assert model.predict(x[0][None]).shape == (1,)


def test_the_api_names_what_it_needs_for_objects_of_other_kinds(model):
    # a plain module, a tensor or a (x, y) tuple where netcleanse's nouns belong: one error saying how
    import netcleanse
    from netcleanse.repair import repair
    x, y = images([1, 2]), torch.tensor([1, 2])
    for call in (lambda: evaluate(FirstPixelNet(), Dataset(x, y)), lambda: netcleanse.scan(FirstPixelNet(), Dataset(x)),
                 lambda: predict_dataset(FirstPixelNet(), Dataset(x))):
        with pytest.raises(NetcleanseError, match="must be a netcleanse Classifier, got FirstPixelNet: wrap it"):
            call()
    for call in (lambda: evaluate(model, (x, y)), lambda: netcleanse.scan(model, x),
                 lambda: repair(model, {}, "unlearn", (x, y))):
        with pytest.raises(NetcleanseError, match="must be a netcleanse Dataset, got (tuple|Tensor): make one"):
            call()
