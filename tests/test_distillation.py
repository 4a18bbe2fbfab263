"""Knowledge distillation through the transformers Trainer (DistillationTrainer), on tiny
randomly initialised BERTs: the loss against a hand computation, weight 0 against the plain
Trainer bit for bit, and the teacher kept out of training."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (BertConfig, BertForSequenceClassification, Trainer,  # noqa: E402
                          TrainingArguments)

from mgpp_kernels.integrations.transformers import (  # noqa: E402
    DEFAULT_DISTILLATION_TEMPERATURE, DEFAULT_DISTILLATION_WEIGHT, DistillationTrainer,
    add_mgpp_callback, create_mgpp, distillation_kl)

NUM_EXAMPLES = 32
BATCH = 8
SEQ = 8


def tiny_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ, num_labels=3)
    return BertForSequenceClassification(config)


def tiny_dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (NUM_EXAMPLES, SEQ), generator=generator)
    lengths = torch.randint(3, SEQ + 1, (NUM_EXAMPLES,), generator=generator)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    return [{"input_ids": ids[i] * mask[i], "attention_mask": mask[i],
             "labels": ids[i, 0] % 3} for i in range(NUM_EXAMPLES)]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=8,
                    learning_rate=1e-2, weight_decay=0.0, logging_steps=2, report_to="none",
                    save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over rows of Σ_c p_c (log p_c − log q_c), p = softmax(teacher/T),
    q = softmax(student/T), written out from the definitions."""
    rows = []
    for s_row, t_row in zip(student.double(), teacher.double()):
        p = [math.exp(v / temperature) for v in t_row.tolist()]
        q = [math.exp(v / temperature) for v in s_row.tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        rows.append(sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q)))
    return torch.tensor(temperature ** 2 * sum(rows) / len(rows), dtype=torch.float64)


def test_defaults_are_movement_pruning_s():
    assert DEFAULT_DISTILLATION_TEMPERATURE == 2.0
    assert DEFAULT_DISTILLATION_WEIGHT == 0.5


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.5])
def test_kl_equals_the_hand_computation(temperature):
    generator = torch.Generator().manual_seed(1)
    student, teacher = (3 * torch.randn(6, 4, generator=generator) for _ in range(2))
    kl = distillation_kl(student, teacher, temperature)
    torch.testing.assert_close(kl.double(), hand_kl(student, teacher, temperature),
                               rtol=1e-5, atol=1e-7)
    assert float(distillation_kl(teacher, teacher, temperature)) == pytest.approx(0, abs=1e-6)


def test_kl_over_tokens_leaves_padding_out():
    generator = torch.Generator().manual_seed(2)
    student, teacher = (torch.randn(2, 5, 7, generator=generator) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kept = mask.bool()
    expected = hand_kl(student[kept], teacher[kept], 2.0)
    torch.testing.assert_close(distillation_kl(student, teacher, 2.0, mask).double(), expected,
                               rtol=1e-5, atol=1e-7)


def test_trainer_loss_equals_the_hand_mix(tmp_path):
    student, teacher = tiny_bert(0), tiny_bert(1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  distillation_temperature=3.0, distillation_weight=0.3,
                                  args=training_args(tmp_path))
    batch = trainer.data_collator(tiny_dataset()[:BATCH])
    student.train()
    loss, outputs = trainer.compute_loss(student, batch, return_outputs=True)

    # Student logits again, in eval mode: dropout off on both sides for the hand computation.
    student.eval()
    loss_eval = trainer.compute_loss(student, batch)
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
    task = torch.nn.functional.cross_entropy(student_logits.double(), batch["labels"])
    expected = 0.7 * task + 0.3 * hand_kl(student_logits, teacher_logits, 3.0)
    torch.testing.assert_close(loss_eval.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert loss.requires_grad and outputs["logits"].shape == (BATCH, 3)
    # The teacher: eval mode, no gradients, unchanged by the student's backward pass.
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def run(tmp_path, trainer_cls, **trainer_kwargs) -> BertForSequenceClassification:
    """Eight MGPP steps that prune to 50%, through ``trainer_cls``."""
    model = tiny_bert(0)
    args = training_args(tmp_path)
    optimizer = create_mgpp(model, args, num_train_examples=NUM_EXAMPLES, initial_warmup_steps=2,
                            pruning_interval=2, initial_sparsity=0.3, final_sparsity=0.5,
                            backend="cpu")
    trainer = trainer_cls(model=model, args=args, train_dataset=tiny_dataset(),
                          optimizers=(optimizer, None), **trainer_kwargs)
    add_mgpp_callback(trainer)
    trainer.train()
    return model


def test_weight_zero_trains_as_the_plain_trainer_bit_for_bit(tmp_path):
    plain = run(tmp_path / "plain", Trainer)
    distilled = run(tmp_path / "kd", DistillationTrainer, teacher_model=tiny_bert(1),
                    distillation_weight=0.0)
    for (name, a), b in zip(plain.state_dict().items(), distilled.state_dict().values()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    # And a positive weight changes the run.
    mixed = run(tmp_path / "mixed", DistillationTrainer, teacher_model=tiny_bert(1))
    assert not torch.equal(plain.classifier.weight, mixed.classifier.weight)


def test_teacher_stays_out_of_the_optimizer_and_unchanged(tmp_path):
    teacher = tiny_bert(1)
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    model = tiny_bert(0)
    args = training_args(tmp_path)
    optimizer = create_mgpp(model, args, num_train_examples=NUM_EXAMPLES, initial_warmup_steps=2,
                            pruning_interval=2, final_sparsity=0.5)
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args,
                                  train_dataset=tiny_dataset(), optimizers=(optimizer, None))
    trainer.train()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert all(torch.equal(before[name], tensor) for name, tensor in teacher.state_dict().items())
    assert not teacher.training


@pytest.mark.parametrize("kwargs", [{"distillation_temperature": 0.0},
                                    {"distillation_weight": 1.5},
                                    {"distillation_weight": -0.1}])
def test_bad_settings_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1),
                            args=training_args(tmp_path), **kwargs)
