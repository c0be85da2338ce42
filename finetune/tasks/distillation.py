"""Distillation: a task's own loss mixed with how far the student's outputs are from a teacher's.

The teacher's outputs on every training example are computed once, before training
(`finetune.training.teacher`), and ride in the batch as the `teacher_logits` column (and `teacher_hidden`,
for hidden-state matching), so the loss here is arithmetic on tensors the batch already holds. With
temperature T and weight alpha (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"):

    loss = (1 - alpha) x task loss + alpha x T^2 x KL(softmax(teacher / T) || softmax(student / T))

multi_label compares each label's sigmoid(logit / T) as a two-outcome distribution (the same KL, averaged
over labels), regression the values themselves (squared difference; T is not used). T^2 keeps the
gradients of the softened term as large as the task loss's whatever T is. Evaluation batches carry no
teacher outputs, so the evaluation loss is the task's own, comparable with runs trained without a teacher.
"""

from __future__ import annotations

from typing import Any, Callable

TEACHER_LOGITS = "teacher_logits"
TEACHER_HIDDEN = "teacher_hidden"


def softmax_kl(student: Any, teacher: Any, temperature: float) -> Any:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    import torch.nn.functional as F

    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def sigmoid_kl(student: Any, teacher: Any, temperature: float) -> Any:
    """T^2 x the KL between each label's softened teacher and student probabilities, averaged over labels and batch.

    Cross-entropy to the teacher's probabilities less the teacher's own entropy: zero when the two agree.
    """
    import torch
    import torch.nn.functional as F

    target = torch.sigmoid(teacher.float() / temperature)
    cross = F.binary_cross_entropy_with_logits(student.float() / temperature, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher.float() / temperature, target, reduction="none")
    return (cross - entropy).mean() * temperature**2


def squared_difference(student: Any, teacher: Any, temperature: float) -> Any:
    """Regression: the mean squared difference to the teacher's values (a temperature softens nothing here)."""
    import torch.nn.functional as F

    return F.mse_loss(student.float().view(teacher.shape), teacher.float())


DISTILLATION_LOSSES: dict[str, Callable[[Any, Any, float], Any]] = {
    "classification": softmax_kl, "multi_label": sigmoid_kl, "regression": squared_difference,
}
"""task.type -> how a student's outputs are compared with the teacher's; the tasks a recipe may distil."""


class DistilledTask:
    """A task whose training loss also pulls toward a teacher; everything else is the wrapped task's.

    Not a Task subclass on purpose: every attribute it does not set (name, features, metrics, answers...) is
    read from the wrapped task, so the data cache, the saved model and serving see the plain task.
    """

    def __init__(self, task: Any, temperature: float, alpha: float, hidden_weight: float = 0.0):
        if task.name not in DISTILLATION_LOSSES:
            raise ValueError(f"distillation is not defined for task {task.name}")
        self.task = task
        self.temperature = temperature
        self.alpha = alpha
        self.hidden_weight = hidden_weight
        self.teacher_keys = (TEACHER_LOGITS,) + ((TEACHER_HIDDEN,) if hidden_weight else ())
        self.target_keys = tuple(task.target_keys) + self.teacher_keys

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not set yet (copying): no wrapped task to ask
            raise AttributeError(name)
        return getattr(self.task, name)

    def split_batch(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        inputs = {k: v for k, v in batch.items() if k not in self.target_keys}
        targets = {k: batch[k] for k in self.target_keys if k in batch}
        if TEACHER_HIDDEN in targets:
            inputs["output_hidden_states"] = True
        return inputs, targets

    def loss(self, outputs: Any, targets: dict[str, Any], settings: Any) -> Any:
        """The mixed loss of a training batch; the task's own loss when the batch has no teacher outputs."""
        own = self.task.loss(outputs, {k: v for k, v in targets.items() if k not in self.teacher_keys}, settings)
        if TEACHER_LOGITS not in targets:
            return own
        soft = DISTILLATION_LOSSES[self.task.name](outputs.logits, targets[TEACHER_LOGITS], self.temperature)
        loss = (1 - self.alpha) * own + self.alpha * soft
        if self.hidden_weight and TEACHER_HIDDEN in targets:
            import torch.nn.functional as F

            first_token = outputs.hidden_states[-1][:, 0].float()
            loss = loss + self.hidden_weight * F.mse_loss(first_token, targets[TEACHER_HIDDEN].float())
        return loss
