package logging

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestJSONUsesCloudLoggingFields(t *testing.T) {
	var buf bytes.Buffer
	New(&buf, Config{LogFormat: "json", LogLevel: "debug"}).Warn("careful", "error", "boom")
	var entry map[string]any
	require.NoError(t, json.Unmarshal(buf.Bytes(), &entry))
	require.Equal(t, "WARNING", entry["severity"])
	require.Equal(t, "careful", entry["message"])
	require.Equal(t, "boom", entry["error"])
	require.NotContains(t, entry, "level")
	require.NotContains(t, entry, "msg")
}

func TestSeverityMapsEveryLevel(t *testing.T) {
	var buf bytes.Buffer
	l := New(&buf, Config{LogFormat: "json", LogLevel: "debug"})
	l.Debug("d")
	l.Info("i")
	l.Error("e")
	var got []string
	for _, line := range bytes.Split(bytes.TrimSpace(buf.Bytes()), []byte("\n")) {
		var entry map[string]any
		require.NoError(t, json.Unmarshal(line, &entry))
		got = append(got, entry["severity"].(string))
	}
	require.Equal(t, []string{"DEBUG", "INFO", "ERROR"}, got)
}

func TestInfoLevelDropsDebug(t *testing.T) {
	var buf bytes.Buffer
	New(&buf, Config{LogFormat: "text", LogLevel: "info"}).Debug("hidden")
	require.Empty(t, buf.String())
}
