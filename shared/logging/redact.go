package logging

import (
	"log/slog"
	"regexp"
)

// Credentials reach log lines inside error messages: url.Parse quotes the
// whole URL it could not parse ("parse \"redis://:secret@…\": invalid port"),
// and a driver may echo a connection string. Every string and error a logger
// of this package writes passes through Redact, so no caller has to
// remember to.
var (
	// userinfo is "scheme://user:password@"; the password runs to the last
	// "@" of the token, so one that holds "@" or "/" is covered too.
	userinfo = regexp.MustCompile(`([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s"'` + "`" + `]*:)[^\s"'` + "`" + `]*@`)
	// keyValue is a password in a query string or a key=value connection
	// string (password=…, pass=…, …).
	keyValue = regexp.MustCompile(`(?i)\b(password|passwd|pass|pwd|secret|token|auth)=("[^"]*"|'[^']*'|[^\s&"'` + "`" + `]*)`)
)

// Redacted replaces every credential Redact removes.
const Redacted = "xxxxx"

// Redact returns s with the password of every URL in it (scheme://user:pass@)
// and every password=… pair replaced by [Redacted]. User names and hosts are
// kept: the logs need them to tell which server a message is about.
func Redact(s string) string {
	s = userinfo.ReplaceAllString(s, "${1}"+Redacted+"@")
	return keyValue.ReplaceAllString(s, "${1}="+Redacted)
}

// redactAttr is a slog ReplaceAttr that redacts every string and error value.
func redactAttr(_ []string, a slog.Attr) slog.Attr {
	switch a.Value.Kind() {
	case slog.KindString:
		a.Value = slog.StringValue(Redact(a.Value.String()))
	case slog.KindAny:
		switch v := a.Value.Any().(type) {
		case slog.Level:
			// The level, which the JSON handler turns into a severity.
		case error:
			a.Value = slog.StringValue(Redact(v.Error()))
		case interface{ String() string }:
			a.Value = slog.StringValue(Redact(v.String()))
		case []string:
			out := make([]string, len(v))
			for i, s := range v {
				out[i] = Redact(s)
			}
			a.Value = slog.AnyValue(out)
		}
	}
	return a
}
