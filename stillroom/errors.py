"""The base of every error a user can fix. The CLI prints these as one sentence, exit code 2."""


class StillroomError(Exception):
    """A problem with the user's project, data or request; the message says what and how to fix it."""


USER_ERRORS: tuple[type[BaseException], ...] = (StillroomError,)
