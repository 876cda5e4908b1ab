import pytest
import torch
from torch import nn

from fxopt import InputError
from fxopt.finetune import distill, distillation_loss


def _pair(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    student = nn.Sequential(nn.Linear(6, 4))
    return teacher, student


def _loader(n=256, batch=32, labels=False):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    data = torch.utils.data.TensorDataset(x, y) if labels else torch.utils.data.TensorDataset(x)
    return torch.utils.data.DataLoader(data, batch_size=batch)


def _unwrap(loader):
    return [batch[0] for batch in loader]  # a list of input tensors is a loader too


def test_distill_brings_the_student_towards_the_teacher():
    teacher, student = _pair()
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = float(distillation_loss(student(x), teacher(x), 4.0))
    lines = []
    history = distill(student, teacher, _unwrap(_loader()), epochs=5, lr=1e-2, progress=lines.append)
    with torch.no_grad():
        after = float(distillation_loss(student(x), teacher(x), 4.0))
    assert after < 0.5 * before, (before, after)
    assert len(history) == 5 and history[-1] < history[0]
    assert len(lines) == 5 and lines[0].startswith("epoch 1/5: loss")
    assert not student.training and not teacher.training


def test_distill_uses_labels_when_asked():
    teacher, student = _pair()
    reference = [p.detach().clone() for p in student.parameters()]
    distill(student, teacher, _loader(labels=True), epochs=1, label_weight=1.0, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(reference, student.parameters()))


def test_distillation_loss_is_zero_for_equal_outputs():
    logits = torch.randn(3, 5)
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs"),
    ({"temperature": 0.0}, "temperature"),
    ({"label_weight": -1.0}, "label_weight"),
])
def test_distill_rejects_bad_options(kwargs, message):
    teacher, student = _pair()
    with pytest.raises(InputError, match=message):
        distill(student, teacher, _unwrap(_loader()), progress=False, **kwargs)


def test_distill_rejects_bad_loaders_and_mismatched_models():
    teacher, student = _pair()
    with pytest.raises(InputError, match="no batches"):
        distill(student, teacher, [], progress=False)
    with pytest.raises(InputError, match="loader yielded a dict"):
        distill(student, teacher, [{"x": torch.randn(2, 6)}], progress=False)
    with pytest.raises(InputError, match="same outputs"):
        distill(nn.Linear(6, 3), teacher, [torch.randn(2, 6)], progress=False)
