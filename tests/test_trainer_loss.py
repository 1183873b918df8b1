"""SharpnessCallback measures the loss the Trainer trains on, also where that is not the
model's ``.loss`` (label smoothing and ``compute_loss_func`` take the labels out of the batch)
and where a micro-batch has no loss tokens."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_hf import TokenDataset, make_trainer, read_rows, training_record
from test_train_probe import StepWitness
from transformers import Trainer

import sharpmeter as sm
from sharpmeter.integrations.hf import SharpnessCallback, TrainerLossWarning

EPSILON = 0.3
# A few steps in, where smoothing changes the loss by more than its float32 rounding.
STEPS = {"max_steps": 6, "logging_steps": 1}


def smoothed(outputs, labels, num_items_in_batch=None, reduction="mean"):
    """A causal LM's label-smoothed cross entropy (what ``label_smoothing_factor`` computes)."""
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets, label_smoothing=EPSILON, reduction=reduction
    )


def smoothed_over_the_step(outputs, labels, num_items_in_batch):
    """The same as transformers asks a ``compute_loss_func`` to be: summed, over the loss tokens
    of the whole step (every micro-batch, every rank)."""
    return smoothed(outputs, labels, reduction="sum") / num_items_in_batch


def smoothed_loss_fn(model, batch):
    """The same loss as the user's own ``loss_fn``: the reference."""
    return smoothed(model(input_ids=batch["input_ids"]), batch["labels"])


LOSS_FUNCS = {"compute_loss_func": smoothed, "compute_loss_func_sum": smoothed_over_the_step}


def trainer_smoothing(path, how: str, **args) -> Trainer:
    """A Trainer that trains on the smoothed loss, through its argument or a loss function."""
    if how == "label_smoothing_factor":
        return make_trainer(path, label_smoothing_factor=EPSILON, **STEPS, **args)
    base = make_trainer(path, **STEPS, **args)
    return Trainer(
        model=base.model,
        args=base.args,
        train_dataset=base.train_dataset,
        compute_loss_func=LOSS_FUNCS[how],
    )


@pytest.mark.parametrize("probe", ["fixed", "train"])
@pytest.mark.parametrize("how", ["label_smoothing_factor", *LOSS_FUNCS])
def test_rows_measure_the_smoothed_loss_the_trainer_trains_on(tmp_path, how, probe):
    """Each row is the one the user's own loss_fn computing the smoothed loss gives (which sees
    the labels too), and training is as without the callback. Before, a fixed probe measured
    the unsmoothed ``.loss`` (the labels stay in the probe), and every training-batch row was
    an error: the Trainer takes the labels out before its forward, where the step's batch is
    recorded; a loss over the step's tokens was divided by None."""
    measure = {"probe": probe, "schedule": sm.Schedule(every=2), "measures": ("critical",)}
    extra = {"gradient_accumulation_steps": 2, "max_grad_norm": 0.5} if probe == "train" else {}
    reference = trainer_smoothing(tmp_path / "a", how, **extra)
    SharpnessCallback.attach(reference, loss_fn=smoothed_loss_fn, **measure)
    reference.train()
    bare = trainer_smoothing(tmp_path / "b", how, **extra)
    bare.train()
    measured = trainer_smoothing(tmp_path / "c", how, **extra)
    SharpnessCallback.attach(measured, **measure)
    measured.train()

    assert "compute_loss" not in vars(measured)  # the label keeper is gone after training
    expected = read_rows(tmp_path / "a" / "out" / "sharpness.jsonl")
    rows = read_rows(tmp_path / "c" / "out" / "sharpness.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected] and len(rows) == 3
    for row, reference_row in zip(rows, expected):
        assert row["critical_status"] == "ok", row
        assert row["loss"] == pytest.approx(reference_row["loss"], rel=1e-6)
        # Torch's smoothing and the Trainer's round differently: the brackets' ends move.
        assert row["critical_sharpness"] == pytest.approx(
            reference_row["critical_sharpness"], rel=1e-4
        )
    params, losses = training_record(measured)
    bare_params, bare_losses = training_record(bare)
    assert losses == bare_losses
    assert all(torch.equal(a, b) for a, b in zip(params, bare_params, strict=True))


class OwnLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_a_trainer_subclass_with_its_own_compute_loss_is_warned_of(tmp_path):
    """Its compute_loss may record metrics, so it is never called: the user hears which loss
    is measured instead. A plain Trainer gets no warning."""
    base = make_trainer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainerLossWarning)
        SharpnessCallback.attach(base)
    own = OwnLossTrainer(model=base.model, args=base.args, train_dataset=base.train_dataset)
    with pytest.warns(TrainerLossWarning, match="OwnLossTrainer overrides compute_loss"):
        SharpnessCallback.attach(own)


class SmoothingTrainer(Trainer):
    """The common subclass: its own compute_loss takes the labels out and smooths."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = smoothed(outputs, labels)
        return (loss, outputs) if return_outputs else loss


def test_a_subclass_that_takes_the_labels_is_measured_with_the_users_loss_fn(tmp_path):
    """As the warning advises, loss_fn= gives the subclass's loss; under probe="train" it sees
    the step's labels, which the subclass takes out before the forward. Before, every row was
    a KeyError."""
    base = make_trainer(tmp_path, **STEPS)
    trainer = SmoothingTrainer(model=base.model, args=base.args, train_dataset=base.train_dataset)
    SharpnessCallback.attach(
        trainer,
        probe="train",
        loss_fn=smoothed_loss_fn,
        schedule=sm.Schedule(every=2),
        measures=("critical",),
    )
    trainer.train()
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert len(rows) == 3 and all(r["critical_status"] == "ok" for r in rows), rows
    assert "compute_loss" not in vars(trainer)


def test_an_unbound_callback_refuses_label_smoothing_before_the_first_step(tmp_path):
    """Without the trainer the callback cannot compute the smoothed loss: one clear error, not
    rows of another loss."""
    trainer = make_trainer(tmp_path, max_steps=2, label_smoothing_factor=EPSILON)
    trainer.add_callback(SharpnessCallback(schedule=sm.Schedule(every=1)))
    with pytest.raises(ValueError, match="label-smoothed loss"):
        trainer.train()
    assert trainer.state.global_step == 0


class PromptMasked(TokenDataset):
    """Completion-only training: every odd example is all prompt, its labels all -100."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        labels = torch.full_like(item["labels"], -100) if i % 2 else item["labels"]
        return {"input_ids": item["input_ids"], "labels": labels}


def test_a_micro_batch_without_loss_tokens_leaves_the_row_to_the_others(tmp_path):
    """Each step accumulates a scored example and a prompt-only one, whose mean loss is 0/0:
    the row is the scored micro-batch's, as the Trainer's step is. Before, rows were nonfinite."""
    base = make_trainer(
        tmp_path, max_steps=4, gradient_accumulation_steps=2, train_sampling_strategy="sequential"
    )
    base.args.per_device_train_batch_size = 1
    trainer = Trainer(model=base.model, args=base.args, train_dataset=PromptMasked())
    witness = StepWitness(trainer.model)
    trainer.add_callback(witness)
    SharpnessCallback.attach(
        trainer, probe="train", schedule=sm.Schedule(every=1), measures=("critical", "trace")
    )
    trainer.train()
    rows = read_rows(tmp_path / "out" / "sharpness.jsonl")
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    model = copy.deepcopy(trainer.model).eval()
    for row in rows:
        params, (scored, prompt_only), _ = witness.at_step[row["step"]]
        assert (prompt_only["labels"] == -100).all() and (scored["labels"] != -100).all()
        with torch.no_grad():
            for p, value in zip(model.parameters(), params, strict=True):
                p.copy_(value)
            assert row["loss"] == pytest.approx(float(model(**scored).loss), rel=1e-6)
