"""Background port scans by need: the interval doubles while an unused sandbox's ports stay the
same, and any use or change brings it back to the base interval."""

from kiln.core.ports import ScanSchedule

BASE, MOST = 2.0, 60.0


def test_an_unused_sandbox_is_scanned_less_and_less_often_up_to_the_most():
    s = ScanSchedule(BASE)
    now, gaps = 0.0, []
    last = None
    while now < 600:
        if s.due(now, used=0.0):
            if last is not None:
                gaps.append(now - last)
            last = now
            s.scanned(now, used=0.0, changed=False, base=BASE, most=MOST)
        now += BASE  # the scan loop's tick
    assert gaps[:5] == [4.0, 8.0, 16.0, 32.0, 60.0] and set(gaps[5:]) == {60.0}


def test_a_use_makes_the_next_tick_scan_and_resets_the_interval():
    s = ScanSchedule(BASE)
    for t in (0.0, 4.0, 12.0, 28.0):
        s.scanned(t, used=0.0, changed=False, base=BASE, most=MOST)
    assert s.interval == 32.0 and not s.due(30.0, used=0.0)
    assert s.due(30.0, used=29.5)  # an exec at 29.5 s: scanned at the next tick
    s.scanned(30.0, used=29.5, changed=False, base=BASE, most=MOST)
    assert s.interval == BASE and s.due(32.0, used=29.5) and not s.due(31.0, used=29.5)


def test_a_change_found_keeps_the_base_interval():
    s = ScanSchedule(BASE)
    s.scanned(0.0, used=0.0, changed=False, base=BASE, most=MOST)
    s.scanned(4.0, used=0.0, changed=True, base=BASE, most=MOST)  # a server came up on its own
    assert s.interval == BASE and s.due(6.0, used=0.0)
