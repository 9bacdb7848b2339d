// Package logging builds the structured logger every function uses: JSON with
// Cloud Logging's field names when deployed, readable text on a terminal,
// and never a password (see [Redact]).
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"os"
)

// Config selects the log format and level. Embed it in a function's config.
type Config struct {
	// LogFormat is "json", "text" or "auto" (json when running on Cloud Run,
	// where K_SERVICE is set, text otherwise).
	LogFormat string `envconfig:"LOG_FORMAT" default:"auto" desc:"Log format: json (Cloud Logging fields), text, or auto (json when K_SERVICE is set). Default auto."`
	// LogLevel is the minimum level logged.
	LogLevel string `envconfig:"LOG_LEVEL" default:"info" desc:"Minimum log level: debug, info, warn or error. Default info."`
	// Project names the Google Cloud project in the trace field of log
	// lines, so that Cloud Logging joins them to the trace.
	Project string `envconfig:"GOOGLE_CLOUD_PROJECT" desc:"Google Cloud project id. A log line written while handling a traced request or entry carries logging.googleapis.com/trace as projects/<project>/traces/<trace id> (the bare trace id when empty), which Cloud Logging needs to show it under its trace and request. Cloud Run does not set it. Default empty."`
}

// Validate checks the two values.
func (c Config) Validate() error {
	switch c.LogFormat {
	case "auto", "json", "text":
	default:
		return fmt.Errorf("LOG_FORMAT must be json, text or auto, not %q", c.LogFormat)
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return fmt.Errorf("LOG_LEVEL must be debug, info, warn or error, not %q", c.LogLevel)
	}
	return nil
}

// New returns a logger writing to w as c says. An invalid level falls back to
// info; call Validate first to reject it. Every message, string and error it
// writes is passed through [Redact]. A record logged with a context that
// carries a span (the *Context methods) gets Cloud Logging's trace fields
// ([TraceKey], [SpanIDKey], [TraceSampledKey]).
func New(w io.Writer, c Config) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.LogLevel))
	format := c.LogFormat
	if format == "auto" || format == "" {
		format = "text"
		if os.Getenv("K_SERVICE") != "" {
			format = "json"
		}
	}
	if format == "json" {
		return slog.New(withTrace(c.Project, slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level, ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			return cloudLogging(groups, redactAttr(groups, a))
		}})))
	}
	return slog.New(withTrace(c.Project, slog.NewTextHandler(w, &slog.HandlerOptions{Level: level, ReplaceAttr: redactAttr})))
}

// cloudLogging renames slog's keys to the ones Cloud Logging reads from a
// container's stdout, so that levels become severities and messages show up
// as the entry's summary.
func cloudLogging(groups []string, a slog.Attr) slog.Attr {
	if len(groups) > 0 {
		return a
	}
	switch a.Key {
	case slog.MessageKey:
		a.Key = "message"
	case slog.LevelKey:
		a.Key = "severity"
		level, _ := a.Value.Any().(slog.Level)
		a.Value = slog.StringValue(severity(level))
	}
	return a
}

func severity(l slog.Level) string {
	switch {
	case l < slog.LevelInfo:
		return "DEBUG"
	case l < slog.LevelWarn:
		return "INFO"
	case l < slog.LevelError:
		return "WARNING"
	default:
		return "ERROR"
	}
}

// Discard is a logger that drops everything, for tests that do not look.
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// Logging returns c; config structs that embed Config inherit it, which lets
// generic code find their logging settings.
func (c Config) Logging() Config { return c }
