package proxy

import "regexp"

// sniffLimit bounds how much of a Responses API body is searched for the
// response id. The id comes first in both the JSON body and the stream's
// response.created event, so a few KiB are enough.
const sniffLimit = 8 << 10

var responseIDPattern = regexp.MustCompile(`"id"\s*:\s*"(resp_[A-Za-z0-9_\-]{1,200})"`)

// responseIDSniffer finds the id of a response created through the
// Responses API, so the proxy can later check that a previous_response_id
// belongs to the mailbox that sends it.
type responseIDSniffer struct {
	buf []byte
	id  string
}

func (s *responseIDSniffer) Write(p []byte) (int, error) {
	if s.id != "" || len(s.buf) >= sniffLimit {
		return len(p), nil
	}
	s.buf = append(s.buf, p[:min(len(p), sniffLimit-len(s.buf))]...)
	if m := responseIDPattern.FindSubmatch(s.buf); m != nil {
		s.id = string(m[1])
		s.buf = nil
	}
	return len(p), nil
}
