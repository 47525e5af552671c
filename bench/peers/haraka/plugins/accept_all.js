// Accept every recipient: the benchmark measures SMTP intake, not routing.
exports.hook_rcpt = (next) => next(OK)
