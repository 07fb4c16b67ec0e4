"""pymulproc's protocol: the requests, and where each field sits in a four-field message
``[request, sender pid, recipient pid, data]``."""

PARENT_COMM_INTERFACE = 1
CHILD_COMM_INTERFACE = 2

REQ_DO = "DO"
REQ_FINISHED = "FINISHED"
REQ_DIE = "DIE"
REQ_TEST_PARENT = "I'M PARENT PROCESS"
REQ_TEST_CHILD = "I'M CHILD PROCESS"

S_PID_OFFSET = 1  # the sender's pid; the request is just before it
R_PID_OFFSET = S_PID_OFFSET + 1  # the recipient's pid; the data is just after it
