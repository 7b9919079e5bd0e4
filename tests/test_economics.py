"""Economics: every expected number below is worked out by hand in the comment beside it."""

import pytest

from stillroom.config import CostConfig, TeacherConfig, VolumeConfig
from stillroom.economics.costs import economics


def _run(p_in=2.50, p_out=10.00, hosting=1.0, project_cost=3000.0, requests=2_000_000, tok_in=500,
         tok_out=20, ips=50.0, coverage=0.8):
    return economics(
        TeacherConfig(price_per_million_input_tokens=p_in, price_per_million_output_tokens=p_out),
        CostConfig(student_hosting_per_hour=hosting, project_cost=project_cost),
        VolumeConfig(requests_per_month=requests, input_tokens_per_request=tok_in,
                     output_tokens_per_request=tok_out),
        student_inputs_per_s=ips, coverage=coverage,
    )


def test_a_student_that_pays_back():
    e = _run()
    # teacher: 500 * 2.50/1e6 + 20 * 10/1e6 = 0.00125 + 0.0002 = 0.00145 $/request
    assert e.teacher_cost_per_request == pytest.approx(0.00145)
    assert e.teacher_per_million_tokens == pytest.approx(0.00145 / 520 * 1e6)  # 2.7885 $/M
    # student: $1/h over 50/s * 3600 s = 180,000 requests/h
    assert e.student_cost_per_request == pytest.approx(1 / 180_000)
    assert e.student_per_million_tokens == pytest.approx(1 / 180_000 / 520 * 1e6)  # 0.01068 $/M
    assert e.cost_ratio == pytest.approx(0.00145 * 180_000)  # 261x
    # month: teacher-only 2M * 0.00145 = 2900; student compute 2M/180k = 11.1 h < 730 h always-on
    assert e.teacher_only_monthly == pytest.approx(2900.0)
    assert e.student_compute_hours_monthly == pytest.approx(2_000_000 / 180_000)
    assert e.student_hosting_monthly == pytest.approx(730.0)
    assert e.teacher_fallback_monthly == pytest.approx(0.2 * 2900)  # 580
    assert e.routed_monthly == pytest.approx(1310.0)
    assert e.monthly_savings == pytest.approx(1590.0)
    assert e.annual_savings == pytest.approx(19_080.0)
    assert e.payback_months == pytest.approx(3000 / 1590)  # 1.887 months
    d = e.as_dict()
    assert d["pays_back"] is True and d["hours_per_month"] == 730.0
    assert d["monthly_savings"] == pytest.approx(1590.0)


def test_cheap_teacher_never_pays_back():
    # 150 * 0.15/1e6 + 5 * 0.60/1e6 = 25.5e-6 $/request -> $25.50/month for 1M requests,
    # less than one always-on replica ($0.10 * 730 = $73) even at full coverage
    e = _run(p_in=0.15, p_out=0.60, hosting=0.10, project_cost=2000, requests=1_000_000, tok_in=150,
             tok_out=5, ips=100.0, coverage=1.0)
    assert e.teacher_only_monthly == pytest.approx(25.5)
    assert e.routed_monthly == pytest.approx(73.0)
    assert e.monthly_savings == pytest.approx(-47.5)
    assert e.payback_months is None and not e.pays_back
    assert e.cost_ratio == pytest.approx(25.5e-6 / (0.10 / 360_000))  # 91.8x cheaper per token, still loses


def test_student_compute_beyond_one_replica_is_paid_for_every_request():
    # a slow student (1 input/s): 10M requests = 2777.8 h of compute > 730 h, at $2/h = $5555.56,
    # paid on all 10M requests, not only the covered half
    e = _run(p_in=10.0, p_out=0.0, hosting=2.0, project_cost=0.0, requests=10_000_000, tok_in=100,
             tok_out=0, ips=1.0, coverage=0.5)
    assert e.teacher_only_monthly == pytest.approx(10_000.0)  # 10M * 100 * 10/1e6
    assert e.student_hosting_monthly == pytest.approx(2.0 * 10_000_000 / 3600)
    assert e.teacher_fallback_monthly == pytest.approx(5_000.0)
    assert e.monthly_savings == pytest.approx(10_000 - 5_000 - 5_555.5556)
    assert e.payback_months is None
    # same student at 90% coverage saves money; a free project pays back at once
    e = _run(p_in=10.0, p_out=0.0, hosting=2.0, project_cost=0.0, requests=10_000_000, tok_in=100,
             tok_out=0, ips=1.0, coverage=0.9)
    assert e.monthly_savings == pytest.approx(10_000 - 1_000 - 5_555.5556)
    assert e.payback_months == 0.0


def test_zero_volume_costs_one_replica_and_never_pays_back():
    e = _run(requests=0, hosting=0.5)
    assert e.teacher_only_monthly == 0.0
    assert e.teacher_fallback_monthly == 0.0
    assert e.routed_monthly == pytest.approx(365.0)  # 0.5 * 730
    assert e.monthly_savings == pytest.approx(-365.0)
    assert e.annual_savings == pytest.approx(-4380.0)
    assert e.payback_months is None


def test_zero_tokens_and_free_hosting_have_no_per_token_price():
    e = _run(tok_in=0, tok_out=0, hosting=0.0)
    assert e.teacher_cost_per_request == 0.0
    assert e.teacher_per_million_tokens is None and e.student_per_million_tokens is None
    assert e.cost_ratio is None
    e = _run(hosting=0.0)
    assert e.student_per_million_tokens == 0.0 and e.cost_ratio is None  # free student: no finite ratio
    assert e.monthly_savings == pytest.approx(0.8 * 2900)


@pytest.mark.parametrize("ips,coverage", [(0.0, 0.5), (None, 0.5), (-3.0, 0.5), (10.0, 1.5), (10.0, -0.1)])
def test_unusable_measurements_are_refused(ips, coverage):
    with pytest.raises(ValueError):
        _run(ips=ips, coverage=coverage)
