"""The periodic progress line of long epochs (nnunet_cl.progress)."""
from nnunet_cl.progress import StepProgress, format_duration


def test_a_line_at_most_every_period_with_rate_and_time_left():
    now = [0.0]
    p = StepProgress(every_s=60, clock=lambda: now[0])
    p.start(250, "epoch 3")
    lines = []
    for _ in range(100):  # 2 s per step: a line at steps 30, 60 and 90
        now[0] += 2.0
        lines.append(p.step())
    shown = [(i + 1, line) for i, line in enumerate(lines) if line]
    assert [i for i, _ in shown] == [30, 60, 90]
    assert shown[0][1] == "epoch 3: step 30/250, 2.00 s/step, about 7.3 min left in this epoch"
    p.start(10, "epoch 4")  # a new epoch starts its own count and clock
    now[0] += 61
    assert p.step() == "epoch 4: step 1/10, 61.00 s/step, about 9.2 min left in this epoch"


def test_off_and_every_step():
    p = StepProgress(every_s=None)
    p.start(5, "epoch 0")
    assert all(p.step() is None for _ in range(5))
    p = StepProgress(every_s=0)
    assert p.step() is None  # steps outside a started loop (a lone train_step) print nothing
    p.start(2, "epoch 0")
    assert p.step().startswith("epoch 0: step 1/2,")


def test_format_duration():
    assert [format_duration(s) for s in (45, 750, 11520)] == ["45 s", "12.5 min", "3.2 h"]
