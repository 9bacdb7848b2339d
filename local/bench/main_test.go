package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
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
	if clusterInstalled() {
		var cluster []string
		for _, f := range report.Figures {
			if strings.Contains(f.Name, "Redis Cluster") {
				cluster = append(cluster, f.Name)
			}
		}
		require.Len(t, cluster, 5, "the relay's three drains and sendemail's two passes on a cluster")
	}
	require.Contains(t, out.String(), "figure")
	_, err = json.Marshal(report)
	require.NoError(t, err)
}

// clusterInstalled says whether the cluster step can run here; it skips
// itself otherwise.
func clusterInstalled() bool {
	for _, bin := range []string{"redis-server", "redis-cli"} {
		if _, err := exec.LookPath(bin); err != nil {
			return false
		}
	}
	return true
}

func TestPeakRSSReadsThisProcess(t *testing.T) {
	kib, err := peakRSS()
	require.NoError(t, err)
	require.Greater(t, kib, int64(1000))
}
