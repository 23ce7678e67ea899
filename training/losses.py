"""Knowledge distillation from one teacher or an ensemble (Hinton et al.; the Pruning Filters
seed's ensemble distillation at temperature 5).

loss = (1 - alpha) * base(student, targets)
       + alpha * mean over teachers of T^2 KL(softmax(teacher / T) || softmax(student / T)),
the KL summed over classes and averaged over the batch. alpha = 1 is pure distillation.
Teachers are frozen, in eval mode, run under the same autocast as the student, and see the
same (mixed) images; each DDP rank runs its own copy on its own batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints.identity import load_held_model
from common.errors import UserError


def kd_term(student, teacher, temperature):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), mean over the batch."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss(nn.Module):
    """The base loss mixed with the distillation term; call with (samples, outputs, targets).

    Args:
        base: the training loss on (outputs, targets) (cross-entropy, label smoothing, mixup's).
        teachers: frozen models whose logits the student matches.
        temperature: T (> 0).
        alpha: weight of the distillation term in [0, 1].
    """
    takes_inputs = True

    def __init__(self, base, teachers, temperature=5.0, alpha=0.5):
        super().__init__()
        self.base, self.teachers = base, list(teachers)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, samples, outputs, targets):
        """(loss, {"loss_ce": base term, "loss_kd": distillation term}) as 0-d tensors."""
        base = self.base(outputs, targets)
        with torch.no_grad():
            logits = [teacher(samples) for teacher in self.teachers]
        kd = torch.stack([kd_term(outputs, t, self.temperature) for t in logits]).mean()
        loss = (1 - self.alpha) * base + self.alpha * kd
        return loss, {"loss_ce": base.detach(), "loss_kd": kd.detach()}


def load_teachers(paths, device, channels_last=False, nb_classes=None):
    """Frozen eval-mode models from our checkpoints (their shapes from the files).

    Args:
        paths: checkpoint files or URLs.
        device: where they run.
        channels_last: the student's memory format.
        nb_classes: the data set's class count; a teacher with another is refused.
    """
    teachers = []
    for path in paths:
        model, held = load_held_model(path)
        if nb_classes is not None and held.num_classes is not None and held.num_classes != nb_classes:
            raise UserError(f"--teacher {path} ({held.label}) has {held.num_classes} classes but the data "
                            f"set has {nb_classes}")
        model.eval().requires_grad_(False).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        teachers.append(model)
    return teachers
