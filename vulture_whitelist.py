# ruff: noqa
"""Names vulture reports as unused although Python itself uses them.

Only false positives belong here; dead code is deleted, not listed. Read by
`vulture` (paths in pyproject's [tool.vulture]); never imported.
"""

_.format  # logging.Formatter.format overrides (echod/logs.py): logging calls them
exc_type  # __exit__(exc_type, exc, traceback) must take all three (echod/pidfile.py)
traceback
frame  # a signal handler is called as handler(signum, frame) (echod/server/signals.py)
# http.server, socketserver and io call these hooks and read these attributes
# (echod/metrics/service.py)
_.do_HEAD, _.do_PUT, _.do_DELETE, _.do_PATCH, _.do_OPTIONS, _.do_TRACE, _.do_CONNECT
_.version_string, _.log_message, _.handle_error, _.readinto
_.protocol_version, _.default_request_version, _.error_content_type, _.error_message_format
_.requestline, _.request_version, _.close_connection
_.daemon_threads, _.block_on_close
# ctypes structure fields written for the kernel to read (echod/server/mmsg.py)
_.iov_base, _.iov_len, _.msg_name, _.msg_namelen, _.msg_iov, _.msg_iovlen, _.msg_control
