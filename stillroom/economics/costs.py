"""What the teacher costs, what the routed student costs, and when the project pays for itself.

Every number comes from the project's `costs`, `volume` and `teacher` sections plus two measured
values: the student's throughput (inputs/s, from `stillroom eval`) and its coverage (the share of
requests it answers at the calibrated threshold). Let

    in, out   = input / output tokens per request          (volume)
    R         = requests per month                         (volume)
    p_in      = teacher $ per million input tokens          (teacher)
    p_out     = teacher $ per million output tokens         (teacher)
    H         = student hosting $ per hour                  (costs)
    s         = student inputs per second, measured         (eval throughput)
    c         = coverage, the share the student answers     (routing calibration)
    P         = one-off project cost $                      (costs)

Per request and per million tokens:

    teacher $/request       = in * p_in / 1e6 + out * p_out / 1e6
    teacher $/M tokens      = teacher $/request / (in + out) * 1e6     (blended over in + out)
    student $/request       = H / (s * 3600)                           (at full utilisation)
    student $/M tokens      = student $/request / (in + out) * 1e6
    ratio                   = teacher $/M tokens / student $/M tokens

Per month:

    teacher-only            = R * teacher $/request
    student compute hours   = R / (s * 3600)
    student hosting         = max(H * 730, H * student compute hours)
    teacher fallback        = (1 - c) * R * teacher $/request
    routed                  = student hosting + teacher fallback
    savings                 = teacher-only - routed;   annual savings = 12 * savings
    payback months          = P / savings, or None ("never") when savings <= 0

Assumptions: a month is 730 hours; at least one student replica is always on, whatever the
volume; the student scores every request (it must, to decide whether to answer), so its compute
grows with all of R, not just the covered share; the teacher is paid per token with no batch or
cache discount, and a fallback request costs the same tokens as a teacher-only one; the measured
throughput holds in production (it was measured on the eval machine, batched).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stillroom.config import CostConfig, TeacherConfig, VolumeConfig

HOURS_PER_MONTH = 730.0
MONTHS_PER_YEAR = 12


@dataclass(frozen=True)
class Economics:
    # inputs, copied so a report can show its assumptions next to its conclusions
    requests_per_month: int
    input_tokens_per_request: int
    output_tokens_per_request: int
    teacher_price_in: float  # $ per million input tokens
    teacher_price_out: float  # $ per million output tokens
    student_hosting_per_hour: float
    student_inputs_per_s: float
    coverage: float
    project_cost: float
    # per request / per million tokens
    teacher_cost_per_request: float
    teacher_per_million_tokens: float | None  # None when a request has no tokens
    student_cost_per_request: float
    student_per_million_tokens: float | None
    cost_ratio: float | None  # teacher / student per million tokens; None when the student is free
    # per month
    teacher_only_monthly: float
    student_compute_hours_monthly: float
    student_hosting_monthly: float
    teacher_fallback_monthly: float
    routed_monthly: float
    monthly_savings: float
    annual_savings: float
    payback_months: float | None  # None: never pays back

    @property
    def pays_back(self) -> bool:
        return self.payback_months is not None

    def as_dict(self) -> dict:
        return {**asdict(self), "pays_back": self.pays_back, "hours_per_month": HOURS_PER_MONTH}


def economics(teacher: TeacherConfig, costs: CostConfig, volume: VolumeConfig,
              student_inputs_per_s: float, coverage: float) -> Economics:
    """Teacher vs routed-student cost per token and per month, savings and payback (formulas above)."""
    if student_inputs_per_s is None or not student_inputs_per_s > 0:
        raise ValueError(f"student_inputs_per_s must be a positive measured throughput, got {student_inputs_per_s!r}")
    if coverage is None or not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be between 0 and 1, got {coverage!r}")

    tokens = volume.input_tokens_per_request + volume.output_tokens_per_request
    requests = volume.requests_per_month
    hosting = costs.student_hosting_per_hour

    teacher_req = (volume.input_tokens_per_request * teacher.price_per_million_input_tokens / 1e6
                   + volume.output_tokens_per_request * teacher.price_per_million_output_tokens / 1e6)
    student_req = hosting / (student_inputs_per_s * 3600)
    teacher_pmt = teacher_req / tokens * 1e6 if tokens else None
    student_pmt = student_req / tokens * 1e6 if tokens else None
    ratio = teacher_pmt / student_pmt if teacher_pmt is not None and student_pmt else None

    teacher_only = requests * teacher_req
    compute_hours = requests / (student_inputs_per_s * 3600)
    student_monthly = max(hosting * HOURS_PER_MONTH, hosting * compute_hours)
    fallback = (1.0 - coverage) * requests * teacher_req
    routed = student_monthly + fallback
    savings = teacher_only - routed
    payback = costs.project_cost / savings if savings > 0 else None

    return Economics(
        requests_per_month=requests,
        input_tokens_per_request=volume.input_tokens_per_request,
        output_tokens_per_request=volume.output_tokens_per_request,
        teacher_price_in=teacher.price_per_million_input_tokens,
        teacher_price_out=teacher.price_per_million_output_tokens,
        student_hosting_per_hour=hosting,
        student_inputs_per_s=student_inputs_per_s,
        coverage=coverage,
        project_cost=costs.project_cost,
        teacher_cost_per_request=teacher_req,
        teacher_per_million_tokens=teacher_pmt,
        student_cost_per_request=student_req,
        student_per_million_tokens=student_pmt,
        cost_ratio=ratio,
        teacher_only_monthly=teacher_only,
        student_compute_hours_monthly=compute_hours,
        student_hosting_monthly=student_monthly,
        teacher_fallback_monthly=fallback,
        routed_monthly=routed,
        monthly_savings=savings,
        annual_savings=savings * MONTHS_PER_YEAR,
        payback_months=payback,
    )
