"""The OpenAI-compatible gateway: the student answers when it is confident, the teacher otherwise.

Routing rule, per request: the student answers the last user message (a label, an extraction
record, a text); if its confidence reaches the threshold calibrated by `stillroom eval` (the lowest
confidence at which it agreed with the teacher at least `routing.target_agreement` of the time),
and its answer is valid for the task (`task.parse`: the schema, the length limit), the answer is
the reply; otherwise the request goes to the live teacher, with the task's `response_format`
(extraction's JSON schema) where the teacher takes one. Asking for the teacher's model name skips
the student. Every request, failed ones included, is one row of `routed_requests`.

PII: the client sent its text to this service on purpose, so the teacher fallback forwards it as
it came; `curation.pii.redact_live: true` redacts every text of the fallback request (the
`curation.pii.input` types, `[EMAIL]`, `[CARD]`, ...) before it goes to the teacher. The student
always reads the original, and the log keeps it (it stays on this machine).

A request's own `response_format` is honoured: `json_object` / `json_schema` are answered by an
extraction student only when its record fits (a `json_schema` other than the task's is checked
against that schema); anything else goes to the teacher with the request's `response_format`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import insert
from starlette.exceptions import HTTPException as StarletteHTTPException

from stillroom.backends.base import BackendError, ChatBackend, refuses_response_format
from stillroom.evaluate.evaluator import deployed_evaluation, deployed_model_path
from stillroom.evaluate.gate import decide
from stillroom.project import Project, ProjectError
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import latest_run

__all__ = ["create_app", "serve", "choose_student"]

logger = logging.getLogger(__name__)

GATEWAY_KEY_ENV = "STILLROOM_GATEWAY_KEY"
SYSTEM_ROLES = ("system", "developer")  # a client that brings its own prompt


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
            status_code=self.status, headers=headers,
        )


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    input: str
    max_tokens: int | None
    temperature: float | None
    stream: bool
    include_usage: bool
    response_format: dict | None = None  # json_object / json_schema as the client sent it; None: text


@dataclass
class Outcome:
    """What the gateway answered, and what it logs about it."""

    text: str = ""
    route: str = "error"
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    log: dict = field(default_factory=dict)
    pii_redacted: int | None = None  # PII findings replaced in the teacher request (redact_live), else None


# ---- the request -----------------------------------------------------------------------------


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ApiError(400, f"{where}[{j}] must be a content part object with a 'type'", param="messages")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}[{j}].text must be a string", param="messages")
                texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where} must be a string or a list of content parts", param="messages")


def _positive_int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ApiError(400, f"'{key}' must be a positive integer, got {value!r}", param=key)
    return value


def parse_request(body) -> ChatRequest:
    """Check an OpenAI chat request body; raises ApiError(400) naming the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if "messages" not in body:
        raise ApiError(400, "'messages' is required: a list of chat messages", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        if m.get("content") is not None:
            _content_text(m["content"], f"messages[{i}].content")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ApiError(400, "no message with role 'user': the gateway answers the last user message",
                       param="messages")
    last = users[-1]
    if messages[last].get("content") is None:
        raise ApiError(400, f"messages[{last}] (the last user message) has no content", param="messages")
    text = _content_text(messages[last]["content"], f"messages[{last}].content")
    if not text.strip():
        raise ApiError(400, f"messages[{last}] (the last user message) has no text", param="messages")

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {model!r}", param="model")
    max_tokens = _positive_int(body, "max_tokens") or _positive_int(body, "max_completion_tokens")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise ApiError(400, f"'temperature' must be a number from 0 to 2, got {temperature!r}",
                       param="temperature")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(model, messages, text, max_tokens, temperature, stream, bool(options.get("include_usage")),
                       _response_format(body.get("response_format")))


def _response_format(value) -> dict | None:
    """The request's response_format, checked: None for absent or `text`."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "'response_format' must be an object with type 'text', 'json_object' or 'json_schema'",
                       param="response_format")
    if value["type"] == "text":
        return None
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "'response_format.json_schema' must be an object with a 'schema' object",
                           param="response_format")
    return value


# ---- which student, which threshold ----------------------------------------------------------


def choose_student(project: Project, student: str | None = None) -> str:
    """The named student, else `routing.student`, else the first that passes the gate, else the
    first trained one."""
    cfg = project.config
    name = student or cfg.routing.student
    if name:
        cfg.student(name)  # UnknownStudent names the students that exist
        return name
    trained = []
    for s in cfg.students:
        evaluation = deployed_evaluation(project, s.name)
        if evaluation is not None:
            try:
                if decide(evaluation, cfg.gate).passed:
                    return s.name
            except ValueError:  # e.g. gate.reference 'human' without human labels: not a pass
                pass
        with project.store.engine.connect() as conn:
            if latest_run(conn, s.name) is not None:
                trained.append(s.name)
    if trained:
        return trained[0]
    names = ", ".join(s.name for s in cfg.students)
    raise ProjectError(f"no student has been trained yet ({names}); run `stillroom train` and `stillroom eval`")


@dataclass
class Routing:
    student_name: str
    student: object  # anything with .predict(list[str]) -> list[Prediction]
    threshold: float
    gate_passed: bool
    stale: bool


def load_routing(project: Project, student: str | None = None) -> Routing:
    """Load the serving student and its calibrated threshold; fails with what to run if missing."""
    from stillroom.train.registry import load_student

    name = choose_student(project, student)
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
    if run is None:
        raise ProjectError(f"student '{name}' has not been trained; run `stillroom train {name}`")
    # The deployed artifact's own evaluation: quantization moves confidences, so its threshold too.
    evaluation = deployed_evaluation(project, name)
    deploy = project.config.student(name).deploy
    if evaluation is None:
        fix = f"stillroom eval {name}" if deploy == "fp32" else f"stillroom export {name} --format {deploy}"
        raise ProjectError(f"student '{name}' (deploy: {deploy}) has no evaluation of its latest run, so there is "
                           f"no routing threshold; run `{fix}`")
    threshold = float(evaluation["calibration"]["threshold"])
    if threshold > 1:
        logger.warning("'%s' never reached routing.target_agreement on the calibration split: every request "
                       "will go to the teacher", name)
    try:
        verdict = decide(evaluation, project.config.gate)
        gate_passed = verdict.passed
        if not verdict.passed:
            logger.warning("serving '%s' although it did not pass the gate: %s", name, verdict.message)
    except ValueError as exc:
        gate_passed = False
        logger.warning("serving '%s' without a gate verdict: %s", name, exc)
    if evaluation.get("stale"):
        logger.warning("the evaluation of '%s' ran against an older eval lock; re-run `stillroom eval %s`",
                       name, name)
    model = load_student(deployed_model_path(project, name))
    _apply_compile_setting(model, project.config.student(name).compile, name)
    model.predict(["warm-up"])  # load embeddings/weights now, not on the first user's request
    return Routing(name, model, threshold, gate_passed, bool(evaluation.get("stale")))


def _apply_compile_setting(model, setting, name: str) -> None:
    """A label-head student's predictions compiled or not as stillroom.yaml says *now*, not as it said
    when the student was trained: `compile` changes how predictions are computed, not the model, so
    changing it needs no retraining. `true` compiles both batch shapes before the gateway takes
    requests (about 100 s each on an AMX CPU, several minutes on an AVX2-only one); anything else
    serves eagerly. Other students have nothing to compile."""
    if getattr(model, "label_head", None) is None or not hasattr(model, "compile_predictions"):
        return
    if setting is not True:
        model.eager_predictions()
        return
    logger.info("compiling '%s''s predictions before serving (minutes on a CPU)", name)
    failed = model.compile_predictions(warm_up=True)
    if failed:
        logger.warning("serving '%s' with eager predictions: %s", name, failed)


# ---- the app ---------------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _fits(record: str, response_format: dict, task_schema: dict | None) -> bool:
    """Whether a canonical JSON record satisfies a request's json_object / json_schema."""
    if response_format["type"] == "json_object":
        return True
    schema = (response_format.get("json_schema") or {}).get("schema")
    if not schema or schema == task_schema:
        return True  # the task's schema: task.parse has checked it already
    import jsonschema

    try:
        jsonschema.validate(json.loads(record), schema)
    except (jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return True


def create_app(project: Project, student: str | None = None, teacher: ChatBackend | None = None,
               routing: Routing | None = None) -> FastAPI:
    """The gateway for a project: loads the student and threshold now, so problems show at startup.
    `routing` serves a given student and threshold instead of the project's trained one."""
    from stillroom.tasks.base import ParseError

    if routing is None:
        routing = load_routing(project, student)
    owns_teacher = teacher is None
    if teacher is None:
        from stillroom.backends.registry import teacher_backend

        teacher = teacher_backend(project.config.teacher, project.root)
    cfg = project.config
    task = project.task
    routed_model = task.name
    teacher_model = cfg.teacher.model
    gateway_key = os.environ.get(GATEWAY_KEY_ENV) or None
    # The teacher gets the task's structured output where it takes one, until it refuses it once.
    structured = {"on": bool(getattr(teacher, "supports_response_format", False)), "refused": None}
    pii = cfg.curation.pii
    redact_live = pii.enabled and pii.redact_live
    predict_lock = asyncio.Lock()  # one prediction at a time: CPU-bound, and students need not be thread-safe

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if owns_teacher and hasattr(teacher, "aclose"):
            await teacher.aclose()

    app = FastAPI(title="stillroom gateway", lifespan=lifespan)
    app.state.routing = routing
    app.state.teacher = teacher

    def check_auth(request: Request) -> None:
        if gateway_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), gateway_key.encode()):
            raise ApiError(401, f"missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                                f"in the gateway's {GATEWAY_KEY_ENV}", code="invalid_api_key")

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return ApiError(400, problems or "invalid request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response(headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.error("unexpected error on %s", request.url.path, exc_info=exc)
        return ApiError(500, f"the gateway failed ({type(exc).__name__}); see its log", "server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "student": routing.student_name, "threshold": routing.threshold,
                "teacher": teacher_model, "gate_passed": routing.gate_passed, "stale": routing.stale,
                "task_type": task.type, "structured_output": (
                    None if task.response_format() is None else
                    "refused: " + structured["refused"] if structured["refused"] else
                    "sent" if structured["on"] else "not supported by the teacher backend")}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_auth(request)
        except ApiError as exc:
            return exc.response()
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": routed_model, "object": "model", "created": created, "owned_by": "stillroom"},
            {"id": teacher_model, "object": "model", "created": created, "owned_by": "teacher"},
        ]}

    async def teacher_answer(req: ChatRequest, out: Outcome) -> None:
        redactor = None
        if redact_live:
            from stillroom.curate.pii import Redactor

            redactor = Redactor(pii)
        if any(m["role"] in SYSTEM_ROLES for m in req.messages):
            messages = req.messages  # the client already speaks to the teacher with its own prompt
            if redactor is not None:
                messages = redactor.messages(messages)
        else:  # the input redacted as `stillroom label` sends it, inside the task's prompt
            messages = [{"role": "user", "content": task.teacher_prompt(redactor(req.input) if redactor else req.input)}]
        if redactor is not None:
            out.pii_redacted = sum(redactor.findings.values())
        response_format = req.response_format or task.response_format()
        extra = {"response_format": response_format} if response_format and structured["on"] else {}
        try:
            try:
                completion = await teacher.chat(messages, max_tokens=req.max_tokens or cfg.teacher.max_tokens,
                                                temperature=req.temperature, **extra)
            except BackendError as exc:
                if not (extra and refuses_response_format(exc)):
                    raise
                # Not billed: ask again by plain prompting, and stop sending it from now on.
                structured.update(on=False, refused=exc.message)
                logger.warning("the teacher refused response_format (%s); prompting without it from now on",
                               exc.message)
                completion = await teacher.chat(messages, max_tokens=req.max_tokens or cfg.teacher.max_tokens,
                                                temperature=req.temperature)
        except BackendError as exc:
            raise ApiError(502, f"the teacher ({teacher_model}) failed: {exc.message}", "upstream_error") from None
        cost = (completion.input_tokens * cfg.teacher.price_per_million_input_tokens
                + completion.output_tokens * cfg.teacher.price_per_million_output_tokens) / 1e6
        text = completion.text
        if task.type == "extraction" and (
                ((req.response_format or {}).get("json_schema") or {}).get("schema") in (None, task.schema)):
            try:
                text = task.parse(text)  # the canonical record (sorted keys, fences and prose stripped)
            except ParseError as exc:  # passed on as it came: the client sees what the teacher said
                logger.warning("the teacher's answer is not a valid record: %s", exc)
        out.text, out.route, out.model = text, "teacher", teacher_model
        out.prompt_tokens, out.completion_tokens = completion.input_tokens, completion.output_tokens
        out.log.update(input_tokens=completion.input_tokens, output_tokens=completion.output_tokens,
                       cost_usd=cost)

    async def answer(req: ChatRequest, out: Outcome) -> None:
        if req.model is not None and req.model not in (routed_model, teacher_model):
            raise ApiError(404, f"unknown model '{req.model}': ask for '{routed_model}' (routed) or "
                                f"'{teacher_model}' (the teacher)", param="model", code="model_not_found")
        if req.model == teacher_model:
            await teacher_answer(req, out)
            return
        if req.response_format is not None and task.type != "extraction":
            await teacher_answer(req, out)  # only an extraction student answers in JSON
            return
        async with predict_lock:
            prediction = (await asyncio.to_thread(routing.student.predict, [req.input]))[0]
        out.log.update(student=routing.student_name, student_label=prediction.label,
                       student_confidence=float(prediction.confidence), threshold=routing.threshold)
        answer_text = prediction.label
        if task.type != "classification":  # a generative student may say something invalid
            try:
                answer_text = task.parse(prediction.label)
            except ParseError as exc:
                logger.info("student answer not valid for the task (%s); asking the teacher", exc)
                answer_text = None
        if answer_text is not None and req.response_format is not None and not _fits(
                answer_text, req.response_format, task.schema if task.type == "extraction" else None):
            answer_text = None
        if answer_text is not None and prediction.confidence >= routing.threshold:
            out.text, out.route, out.model = answer_text, "student", routed_model
            # The student reads no tokenizer's bill; usage is a whitespace word count, an estimate.
            out.prompt_tokens, out.completion_tokens = len(req.input.split()), len(answer_text.split())
            out.log.update(cost_usd=0.0)
            return
        await teacher_answer(req, out)

    def record(row: dict) -> None:
        try:
            with project.store.engine.begin() as conn:
                conn.execute(insert(T.routed_requests).values(**row))
        except Exception as exc:  # the answer matters more than its log line
            logger.warning("could not log request %s in routed_requests: %s", row.get("request_id"), exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        headers = {"x-stillroom-request-id": request_id}
        out = Outcome()
        req: ChatRequest | None = None
        status, error = 200, None
        try:
            check_auth(request)
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
            req = parse_request(body)
            await answer(req, out)
        except ApiError as exc:
            status, error, response = exc.status, exc, exc.response(headers=headers)
        except Exception as exc:
            logger.exception("request %s failed", request_id)
            status = 500
            error = ApiError(500, f"the gateway failed to answer ({type(exc).__name__}); "
                                  f"see its log for request {request_id}", "server_error")
            response = error.response(headers=headers)

        if error is None:
            headers["x-stillroom-route"] = out.route
            if "student_confidence" in out.log:
                headers["x-stillroom-confidence"] = f"{out.log['student_confidence']:.6f}"
            if out.pii_redacted is not None:
                headers["x-stillroom-pii-redacted"] = str(out.pii_redacted)
            created = int(time.time())
            if req.stream:
                response = StreamingResponse(
                    _sse(request_id, created, out, req.include_usage), media_type="text/event-stream",
                    headers=headers,
                )
            else:
                response = JSONResponse({
                    "id": request_id, "object": "chat.completion", "created": created, "model": out.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": _usage(out.prompt_tokens, out.completion_tokens),
                }, headers=headers)

        row = {
            "request_id": request_id,
            "model": out.model if error is None else (req.model if req else None),
            "input": req.input if req else None,
            "route": out.route if error is None else "error",
            "output": out.text if error is None else None,
            "status_code": status,
            "error": error.message if error else None,
            "latency_ms": (time.perf_counter() - started) * 1000,
            "created_at": now(),
            **out.log,
        }
        await asyncio.to_thread(record, row)
        return response

    return app


async def _sse(request_id: str, created: int, out: Outcome, include_usage: bool):
    """The whole answer is known before the first byte: one content chunk, a finish chunk, [DONE]."""
    def chunk(delta: dict, finish: str | None) -> str:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": out.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": out.text}, None)
    yield chunk({}, "stop")
    if include_usage:
        usage = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": out.model,
                 "choices": [], "usage": _usage(out.prompt_tokens, out.completion_tokens)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def serve(project: Project, host: str = "127.0.0.1", port: int = 8000, student: str | None = None) -> None:
    """Run the gateway with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(project, student), host=host, port=port, log_level="info")
