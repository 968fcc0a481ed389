"""Distiller: loss terms against hand computations, projections, training, bad input."""
import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseq.distill import Distiller, kd_loss, representation_loss


class Fixed(nn.Module):
    """A 'model' whose output is a fixed tensor plus a trainable offset (zero at the start)."""

    def __init__(self, output):
        super().__init__()
        self.output = output
        self.offset = nn.Parameter(torch.zeros_like(output))

    def forward(self, x):
        return self.output + self.offset


def mlp(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


STUDENT_LOGITS = [[1.0, -0.5, 2.0], [0.2, 0.3, -1.0]]
TEACHER_LOGITS = [[2.0, 0.0, 1.0], [-1.0, 1.5, 0.5]]
LABELS = [2, 0]


def softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def hand_kd(temperature, alpha, labels):
    """Hinton KD written out with math on Python floats."""
    kl = 0.0
    for student_row, teacher_row in zip(STUDENT_LOGITS, TEACHER_LOGITS):
        p_teacher, p_student = softmax(teacher_row, temperature), softmax(student_row, temperature)
        kl += sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_teacher, p_student))
    soft = temperature ** 2 * kl / len(STUDENT_LOGITS)
    if labels is None:
        return soft
    ce = -sum(math.log(softmax(row, 1.0)[label]) for row, label in zip(STUDENT_LOGITS, labels))
    return alpha * soft + (1 - alpha) * ce / len(labels)


@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.5), (2.0, 0.9), (1.0, 0.0)])
def test_kd_loss_equals_hand_computation(temperature, alpha):
    student, teacher = torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS)
    labels = torch.tensor(LABELS)
    expected = hand_kd(temperature, alpha, LABELS)
    assert kd_loss(student, teacher, labels, temperature, alpha).item() == pytest.approx(expected, rel=1e-5)
    distiller = Distiller(Fixed(teacher), Fixed(student), temperature=temperature, alpha=alpha)
    batch = (torch.zeros(2, 1), labels)
    assert distiller.loss(batch).item() == pytest.approx(expected, rel=1e-5)
    assert distiller.last_terms["output"] == pytest.approx(expected, rel=1e-5)


def test_kd_without_labels_is_the_soft_term_alone():
    student, teacher = torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS)
    expected = hand_kd(4.0, 0.5, None)
    assert kd_loss(student, teacher, None, 4.0, 0.5).item() == pytest.approx(expected, rel=1e-5)
    distiller = Distiller(Fixed(teacher), Fixed(student), output_kind="logits")
    assert distiller.loss((torch.zeros(2, 1), None)).item() == pytest.approx(expected, rel=1e-5)


def test_kd_gradient_reaches_the_student_only():
    teacher, student = Fixed(torch.tensor(TEACHER_LOGITS)), Fixed(torch.tensor(STUDENT_LOGITS))
    Distiller(teacher, student).loss((torch.zeros(2, 1), torch.tensor(LABELS))).backward()
    assert student.offset.grad is not None and student.offset.grad.abs().sum() > 0
    assert teacher.offset.grad is None


def test_hidden_outputs_use_mse_plus_cosine():
    torch.manual_seed(0)
    student_out, teacher_out = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    cosine = (student_out * teacher_out).sum(-1) / (student_out.norm(dim=-1) * teacher_out.norm(dim=-1))
    expected = ((student_out - teacher_out) ** 2).mean() + (1 - cosine).mean()
    assert representation_loss(student_out, teacher_out).item() == pytest.approx(expected.item(), rel=1e-5)
    distiller = Distiller(Fixed(teacher_out), Fixed(student_out))  # no labels, no logits field: hidden
    assert distiller.loss((torch.zeros(1), None)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_custom_loss_replaces_the_output_term():
    seen = {}

    def l1(student_out, teacher_out, labels):
        seen["labels"] = labels
        return (student_out - teacher_out).abs().mean()

    student, teacher = torch.tensor(STUDENT_LOGITS), torch.tensor(TEACHER_LOGITS)
    distiller = Distiller(Fixed(teacher), Fixed(student), loss=l1)
    labels = torch.tensor(LABELS)
    assert distiller.loss((torch.zeros(1), labels)).item() == pytest.approx(
        (student - teacher).abs().mean().item())
    assert seen["labels"] is labels
    bad = Distiller(Fixed(teacher), Fixed(student), loss=lambda s, t, y: s - t)
    with pytest.raises(TypeError, match="scalar tensor"):
        bad.loss((torch.zeros(1), None))


def test_feature_loss_goes_through_a_learned_projection():
    teacher, student = mlp([6, 16, 3], seed=0), mlp([6, 8, 3], seed=1)
    distiller = Distiller(teacher, student, features={"0": "0"}, output_kind="logits")
    projection = distiller.projections["0"]
    assert (projection.in_features, projection.out_features) == (8, 16)
    assert [p for p in distiller.parameters()] == [projection.weight, projection.bias]
    x = torch.randn(4, 6)
    loss = distiller.loss((x, None))
    with torch.no_grad():
        expected_features = F.mse_loss(projection(student[0](x)), teacher[0](x))
        expected = kd_loss(student(x), teacher(x), None) + expected_features
    assert distiller.last_terms["features"] == pytest.approx(expected_features.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert projection.weight.grad.abs().sum() > 0 and student[0].weight.grad.abs().sum() > 0


def test_feature_widths_are_measured_on_example_inputs_when_the_module_does_not_say():
    teacher, student = mlp([6, 16, 3], seed=0), mlp([6, 8, 3], seed=1)
    with pytest.raises(ValueError, match="example_inputs"):
        Distiller(teacher, student, features={"1": "1"})  # ReLU outputs: width unknown statically
    distiller = Distiller(teacher, student, features={"1": "1"}, example_inputs=torch.randn(2, 6))
    assert (distiller.projections["1"].in_features, distiller.projections["1"].out_features) == (8, 16)
    same_width = Distiller(teacher, mlp([6, 16, 3], seed=2), features={"0": "0"})
    assert len(same_width.projections) == 0


def test_width_mismatch_without_projection_is_an_error():
    teacher, student = mlp([6, 16, 3], seed=0), mlp([6, 8, 3], seed=1)
    with pytest.raises(ValueError, match=r"student '0' gives 8, teacher '0' gives 16"):
        Distiller(teacher, student, features={"0": "0"}, projection=False)


def test_fit_lowers_the_loss_and_adds_the_projections_to_the_optimizer(caplog):
    teacher, student = mlp([10, 64, 64, 5], seed=0), mlp([10, 16, 5], seed=1)
    torch.manual_seed(2)
    loader = [(torch.randn(32, 10), None) for _ in range(8)]
    distiller = Distiller(teacher, student, temperature=2.0, features={"0": "0"}, output_kind="logits")
    held_out = (torch.randn(64, 10), None)
    with torch.no_grad():
        before = distiller.loss(held_out).item()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    student.eval()
    with caplog.at_level(logging.INFO, logger="sparseq.distill"):
        history = distiller.fit(loader, optimizer, epochs=5, max_steps=30, log_every=10, progress=False)
    assert len(history) == 30
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"][0] is \
        distiller.projections["0"].weight
    assert not student.training  # modes restored
    with torch.no_grad():
        after = distiller.loss(held_out).item()
    assert after < 0.5 * before
    assert sum(history[-5:]) < sum(history[:5])
    assert len([r for r in caplog.records if "step" in r.getMessage()]) == 3


def test_fit_keeps_a_pruned_students_zeros_through_its_optimizer_hook():
    teacher, student = mlp([10, 32, 5], seed=0), mlp([10, 32, 5], seed=1)
    masks = {layer.weight: (torch.rand_like(layer.weight) > 0.5).float() for layer in (student[0], student[2])}
    with torch.no_grad():
        for weight, mask in masks.items():
            weight.mul_(mask)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)

    def reapply_masks(opt, args, kwargs):
        with torch.no_grad():
            for weight, mask in masks.items():
                weight.mul_(mask)

    optimizer.register_step_post_hook(reapply_masks)
    torch.manual_seed(3)
    loader = [(torch.randn(16, 10), None) for _ in range(10)]
    history = Distiller(teacher, student, output_kind="logits").fit(loader, optimizer, epochs=2,
                                                                    progress=False)
    for weight, mask in masks.items():
        assert torch.equal(weight[mask == 0], torch.zeros(int((mask == 0).sum())))
        assert (weight[mask == 1] != 0).all()
    assert sum(history[-5:]) < sum(history[:5])


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_static"])
def test_fit_trains_a_qat_student(scheme):
    from sparseq.quant import QATLinear, prepare_qat

    teacher = mlp([10, 32, 5], seed=0)
    student = prepare_qat(mlp([10, 32, 5], seed=1), scheme, act_bits=7)
    torch.manual_seed(4)
    loader = [(torch.randn(16, 10), None) for _ in range(10)]
    distiller = Distiller(teacher, student, output_kind="logits", features={"0": "0"})
    held_out = (torch.randn(64, 10), None)
    with torch.no_grad():
        before = distiller.loss(held_out).item()
    distiller.fit(loader, torch.optim.Adam(student.parameters(), lr=1e-2), epochs=3, progress=False)
    with torch.no_grad():
        after = distiller.loss(held_out).item()
    assert type(student[0]) is QATLinear and after < 0.5 * before


def test_bad_input_is_reported_clearly():
    teacher, student = mlp([6, 16, 3], seed=0), mlp([6, 8, 4], seed=1)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        Distiller("teacher", student)
    with pytest.raises(ValueError, match="same module"):
        Distiller(teacher, teacher)
    with pytest.raises(ValueError, match="temperature"):
        Distiller(teacher, student, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        Distiller(teacher, student, alpha=1.5)
    with pytest.raises(ValueError, match="output_kind"):
        Distiller(teacher, student, output_kind="probabilities")
    with pytest.raises(ValueError, match="student has no submodule named 'fc9'"):
        Distiller(teacher, student, features={"fc9": "0"})
    with pytest.raises(ValueError, match="attention=True needs transformers models"):
        Distiller(teacher, student, attention=True)
    distiller = Distiller(teacher, student)
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pair"):
        distiller.loss(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"student output of shape \(2, 4\) does not match teacher "
                                         r"output of shape \(2, 3\)"):
        distiller.loss((torch.randn(2, 6), None))
    matching = Distiller(teacher, mlp([6, 8, 3], seed=1))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        matching.loss((torch.randn(2, 6), torch.tensor([[0], [1]])))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epochs"):
        matching.fit([(torch.randn(2, 6), None)], optimizer, epochs=0)
    with pytest.raises(TypeError, match="optimizer"):
        matching.fit([(torch.randn(2, 6), None)], "sgd")
    with pytest.raises(ValueError, match="loader is empty"):
        matching.fit([], optimizer, progress=False)
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(ValueError, match=r"step 0 .*does not match"):
        distiller.fit([(torch.randn(2, 6), None)], optimizer, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


# ------------------------------------------------------------------------------------------------
# transformers encoders (the MiniLM example's path)
# ------------------------------------------------------------------------------------------------

def tiny_bert(layers, seed, attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, initializer_range=0.3,
                                     attn_implementation=attn)
    return transformers.BertModel(config).eval()


def text_batches(count, seed):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(1, 40, (4, 9), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, 6:] = 0  # one padded sentence
        batches.append(({"input_ids": input_ids, "attention_mask": attention_mask}, None))
    return batches


def test_encoder_hidden_states_compare_unpadded_positions_only():
    teacher, student = tiny_bert(2, seed=0), tiny_bert(1, seed=1)
    (inputs, _), = text_batches(1, seed=0)
    distiller = Distiller(teacher, student)
    loss = distiller.loss((inputs, None))
    with torch.no_grad():
        keep = inputs["attention_mask"].bool()
        expected = representation_loss(student(**inputs).last_hidden_state[keep],
                                       teacher(**inputs).last_hidden_state[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert Distiller(teacher, copy.deepcopy(teacher)).loss((inputs, None)).item() == pytest.approx(0, abs=1e-5)


def test_fit_distils_a_transformers_encoder():
    teacher, student = tiny_bert(2, seed=0), tiny_bert(1, seed=1)
    distiller = Distiller(teacher, student, features={"encoder.layer.0": "encoder.layer.0"},
                          example_inputs=text_batches(1, seed=9)[0][0])
    held_out = text_batches(2, seed=1)
    with torch.no_grad():
        before = sum(distiller.loss(b).item() for b in held_out)
    history = distiller.fit(text_batches(6, seed=2), torch.optim.Adam(student.parameters(), lr=3e-3),
                            epochs=4, progress=False)
    with torch.no_grad():
        after = sum(distiller.loss(b).item() for b in held_out)
    assert len(history) == 24 and set(distiller.last_terms) == {"output", "features", "total"}
    assert after < 0.5 * before


def test_attention_transfer_between_transformers():
    teacher, student = tiny_bert(4, seed=0, attn="eager"), tiny_bert(2, seed=1, attn="eager")
    (inputs, _), = text_batches(1, seed=0)
    distiller = Distiller(teacher, student, attention=True)
    distiller.loss((inputs, None))
    with torch.no_grad():
        student_maps = student(**inputs, output_attentions=True).attentions
        teacher_maps = teacher(**inputs, output_attentions=True).attentions
    rows = 4 * 2 * 9  # batch * heads * queries
    expected = sum((t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum() / rows
                   for s, t in zip(student_maps, (teacher_maps[1], teacher_maps[3]))) / 2
    assert distiller.last_terms["attention"] == pytest.approx(expected.item(), rel=1e-4)
    assert Distiller(teacher, copy.deepcopy(teacher), attention=True).loss((inputs, None)).item() == \
        pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        Distiller(tiny_bert(2, seed=0), tiny_bert(2, seed=1), attention=True).loss((inputs, None))
