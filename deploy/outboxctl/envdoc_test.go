package main

import (
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestREADMEListsEveryVariable(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	updated, err := replaceEnvdoc(readme)
	require.NoError(t, err)
	require.Equal(t, string(updated), string(readme), "README.md's configuration tables are stale: run make docs")
}
