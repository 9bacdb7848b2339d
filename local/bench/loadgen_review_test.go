package main

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

// The load generator is said to read like wrk, which reconnects when an
// answer says Connection: close. net/http's server says it when it will not
// keep the connection (shutting down, an unread body past its limit), and
// then closes it; a client that puts the connection back in its idle pool
// fails its next request on a server that is fine, and counts the failure
// against the HTTP side.
func TestEveryRequestAfterAnAnswerThatClosesTheConnectionSucceeds(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Connection", "close")
		w.Header().Set("Content-Length", "3")
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte("{}\n"))
	}))
	defer srv.Close()
	c := newKeepAliveClients(strings.TrimPrefix(srv.URL, "http://"))
	defer c.close()
	for i := range 3 {
		assert.NoError(t, c.post(`{"email":"a@example.com","name":"A"}`), "request %d", i+1)
	}
}
