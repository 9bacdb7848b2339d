package logging

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/trace"
)

func TestLogLinesCarryTheTraceOfTheirContext(t *testing.T) {
	t.Parallel()
	sc := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID:    trace.TraceID{0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36},
		SpanID:     trace.SpanID{0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7},
		TraceFlags: trace.FlagsSampled,
	})
	traced := trace.ContextWithSpanContext(context.Background(), sc)
	tests := []struct {
		name, project string
		ctx           context.Context
		want          map[string]any // nil: no trace fields
	}{
		{"writes the project's trace name when the project is set", "my-project", traced, map[string]any{
			TraceKey: "projects/my-project/traces/4bf92f3577b34da6a3ce929d0e0e4736", SpanIDKey: "00f067aa0ba902b7", TraceSampledKey: true}},
		{"writes the bare trace id without a project", "", traced, map[string]any{
			TraceKey: "4bf92f3577b34da6a3ce929d0e0e4736", SpanIDKey: "00f067aa0ba902b7", TraceSampledKey: true}},
		{"writes no trace fields without a span", "my-project", context.Background(), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			New(&out, Config{LogFormat: "json", LogLevel: "info", Project: tt.project}).With("k", "v").InfoContext(tt.ctx, "hello")
			var line map[string]any
			require.NoError(t, json.Unmarshal(out.Bytes(), &line))
			assert.Equal(t, "v", line["k"], "attributes of With are kept")
			for _, k := range []string{TraceKey, SpanIDKey, TraceSampledKey} {
				if tt.want == nil {
					assert.NotContains(t, line, k)
				} else {
					assert.Equal(t, tt.want[k], line[k], k)
				}
			}
		})
	}
	t.Run("the text format carries them too", func(t *testing.T) {
		var out bytes.Buffer
		New(&out, Config{LogFormat: "text", LogLevel: "info"}).InfoContext(traced, "hello")
		assert.True(t, strings.Contains(out.String(), SpanIDKey+"=00f067aa0ba902b7"), out.String())
	})
}
