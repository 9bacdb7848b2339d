package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestSmoke runs every measurement on tiny sizes so that make bench keeps
// working; the figures it produces mean nothing.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("runs every measurement")
	}
	var out bytes.Buffer
	report, err := Run(context.Background(), smokeSettings, "", &out)
	require.NoError(t, err, out.String())
	names := map[string]bool{}
	for _, f := range report.Figures {
		names[strings.Fields(f.Name)[0]] = true
		require.Positive(t, f.Value, "%s has a value", f.Name)
	}
	for _, want := range []string{"createuser", "tx/s", "relay", "commit-to-stream", "sendemail,", "end"} {
		require.True(t, names[want], "a figure starting with %q", want)
	}
	require.Contains(t, out.String(), "figure")
	_, err = json.Marshal(report)
	require.NoError(t, err)
}

func TestPeakRSSReadsThisProcess(t *testing.T) {
	kib, err := peakRSS()
	require.NoError(t, err)
	require.Greater(t, kib, int64(1000))
}
